"""Per-sample gradient clipping for DP-SGD: ``clip_per_sample``: the API.

Routes (validation of every argument, library and device comes first, before
any work):

* CPU (NumPy arrays, torch CPU tensors): fused Numba kernels.  Pass 1 reads
  every per-sample gradient once for its per-sample power sums, pass 2 reads it
  again and writes only the batch reduction (``out[d] = sum_b f_b g[b, d]``),
  never the clipped per-sample copies.
* GPU (CuPy arrays, CUDA tensors): the same two passes as CUDA kernels
  (``_gpu/per_sample_kernels.cu``, driver ``_gpu/_per_sample.py``) on torch's
  current stream for tensors and CuPy's current stream for CuPy arrays; norms,
  factors and outputs stay on the device.  One host synchronisation: the
  clipped count ``n_clipped`` (a Python int) is read back at the end of the
  call, after every kernel is queued.  Without a usable GPU (CuPy missing, no
  device) device arrays raise ``GPUUnavailableError``.
* Dask arrays: a lazy graph of the same two passes (``_dask/_per_sample.py``);
  ``n_clipped`` is a lazy 0-d int64 dask array there.
* Other Array API libraries: a generic path built from ``array_api_compat``
  operations (correct, not fast).
"""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import numpy as np

from .. import _dispatch
from .._formulas import clip_coefficients
from .._validate import check_eps, check_max_norm, check_ord

_REDUCES = ("sum", "mean", None)


class _Fields(NamedTuple):
    grads: Any
    norms: Any
    n_clipped: int


class PerSampleClipResult(_Fields):
    """What :func:`clip_per_sample` returns (a named tuple: unpack or use the names).

    ``g, norms, n = clip_per_sample(...)`` unpacks its three fields; the
    per-array counts of optax's ``per_example_layer_norm_clip`` are the
    property :attr:`n_clipped_per_layer`.

    Attributes
    ----------
    grads : array or list of arrays
        ``reduce="sum"``: ``sum_b f_b g[b]`` of each input, shape ``g.shape[1:]``;
        ``"mean"``: that divided by B (an empty batch, B = 0: zeros);
        ``None``: the clipped per-sample arrays (new arrays, shape ``g.shape``).
        Same library and dtype as the inputs; a single array when a single
        array was passed, else a list.
    norms : array
        Per-sample norms before clipping, in the inputs' library: shape ``[B]``
        (flat clipping) or ``[n_arrays, B]`` (``per_layer=True``); float64 if
        any input is float64, else float32.
    n_clipped : int
        Samples whose factor is below 1 (with ``per_layer=True``: samples with
        at least one array clipped); 0 for an empty batch.  On the Dask route
        a lazy 0-d int64 dask array (``int(result.n_clipped)`` computes it).
    """

    # No __slots__ (a tuple subclass cannot have non-empty ones): each instance
    # keeps the bounds and eps that n_clipped_per_layer needs in its __dict__,
    # outside the tuple, so three-field unpacking, equality and pickling stay
    # those of the named tuple.

    @property
    def n_clipped_per_layer(self) -> tuple[int, ...]:
        """Clipped samples per array: optax ``per_example_layer_norm_clip``'s counts.

        With ``per_layer=True``, entry ``k`` counts the samples ``b`` whose
        factor ``min(1, C_k / (n_{k,b} + eps))`` is below 1, computed from the
        returned ``norms`` (as optax counts from its own norms), so a float32
        norm within one rounding of its bound can count differently from the
        route's float64 decision behind ``n_clipped``; with flat clipping
        every array of a clipped sample is scaled, so each entry is
        ``n_clipped``.  Computed on first access (a host read of the norms on
        the GPU route, a compute on the Dask route, of a dask ``max_norm``
        too), not during the call.
        """
        spec = self.__dict__.get("_count_spec")
        if spec is None:
            raise AttributeError(
                "n_clipped_per_layer is known only for a result returned by "
                "fastclip.clip_per_sample (not one built or _replace()d by hand)"
            )
        counts = self.__dict__.get("_counts")
        if counts is None:
            bounds, eps, per_layer, n = spec
            if per_layer:
                if not isinstance(bounds, np.ndarray):  # a dask max_norm: computed, checked
                    bounds = _check_bounds(np.asarray(bounds), per_layer, n)
                f = clip_coefficients(host_float64(self.norms), bounds[:, None], eps)
                counts = tuple(int(c) for c in np.count_nonzero(f < 1.0, axis=1))
            else:
                counts = (int(self.n_clipped),) * n
            self.__dict__["_counts"] = counts
        return counts  # type: ignore[no-any-return]


@_dispatch.public("fastclip.clip_per_sample", "grads")
def clip_per_sample(
    grads: Any,
    max_norm: Any,
    ord: Any = 2,
    *,
    per_layer: bool = False,
    reduce: str | None = "sum",
    eps: float = 1e-6,
) -> PerSampleClipResult:
    r"""Clip every sample's gradient to ``max_norm``, then sum (or average) over the batch.

    The DP-SGD step of Opacus (``clipping="flat"`` or per-layer) and optax's
    ``per_example_global_norm_clip``.  With ``g_k[b]`` sample ``b``'s slice of
    array ``k``:

    .. math:: n_b = \big\|(g_1[b], \ldots, g_K[b])\big\|_p, \qquad
              f_b = \min\Big(1, \frac{C}{n_b + \varepsilon}\Big), \qquad
              \mathrm{out}_k = \sum_b f_b\, g_k[b]

    With ``per_layer=True`` each array has its own norm ``n_{k,b} = \|g_k[b]\|_p``,
    factor ``f_{k,b}`` and bound ``C_k``.

    Parameters
    ----------
    grads : array or sequence of arrays
        Per-sample gradients, each of shape ``[B, ...]`` with the same ``B >= 0``;
        real floating dtypes (float16, bfloat16, float32, float64), all from one
        library and device.
    max_norm : float, or sequence of floats with ``per_layer=True``
        The bound ``C >= 0`` (``inf``: no clipping); with ``per_layer=True``
        either one number for every array or one per array.  A dask array
        (size 1, or 1-d with one bound per array and ``per_layer=True``) with
        dask ``grads`` stays lazy: its values are checked in the graph, a NaN
        or negative one raising the ValueError when a result is computed.
    ord : float, default 2
        Any real ``p > 0`` or ``inf`` (also ``"inf"``).
    per_layer : bool, default False
        Clip each array's per-sample slice separately (Opacus per-layer)
        instead of all arrays of a sample together (flat).
    reduce : {"sum", "mean", None}, default "sum"
        Reduction over the batch axis; ``None`` returns the clipped
        per-sample arrays.  ``"mean"`` divides by the batch's own ``B``
        (zeros for ``B = 0``, see Notes); for DP-SGD with Poisson sampling
        use ``"sum"`` and divide by the expected batch size, as Opacus does.
    eps : float, default 1e-6
        Added to the norm in the factor (Opacus uses 1e-6; optax uses 0).

    Returns
    -------
    PerSampleClipResult
        ``(grads, norms, n_clipped)``; see :class:`PerSampleClipResult`.

    Raises
    ------
    ValueError
        Arrays of rank 0, different batch sizes, an empty list,
        negative or NaN ``max_norm``, a ``max_norm`` list of the wrong length
        (or given without ``per_layer``), an unknown ``reduce``, a bad ``ord``
        or ``eps``.  Raised before any work (a dask ``max_norm``'s values:
        when the result is computed).
    TypeError
        Integer, bool or complex arrays; mixed libraries or devices (also CPU
        and CUDA tensors in one call, or CuPy arrays on two devices); a dask
        ``max_norm`` with other arrays than dask arrays.
    GPUUnavailableError
        CuPy arrays or CUDA tensors where CuPy is missing or sees no device.

    Notes
    -----
    An empty batch (``B = 0``: Poisson sampling draws one with probability
    ``(1 - q)^N``) is valid on every route: the sums are zeros of shape
    ``g.shape[1:]``, the norms have shape ``[0]`` (``[K, 0]`` per layer),
    ``n_clipped`` is 0, and ``reduce=None`` returns the empty ``[0, ...]``
    arrays; no Numba or CUDA kernel runs, nothing is read back.  Opacus does the same
    (``DPOptimizer.clip_and_accumulate`` sums with an empty factor vector).
    Its mean divides that zero sum by the *expected* batch size, so a mean
    over an empty batch is zeros here too, never the NaN of ``0 / 0``: a
    Poisson-sampled training loop must not crash nor turn its weights NaN on
    an empty draw.

    A zero-norm sample gets factor 1 (optax turns its ``0/0`` into 1); a NaN
    norm gives a NaN factor, so non-finite samples make the result non-finite
    (as Opacus).  Non-contiguous inputs are first copied to contiguous memory;
    the norms come from one pass over each array (power sums in float64 per
    sample, float32 blocks for 32- and 16-bit data) and the sum from a second
    pass that accumulates float32 blocks of rows in float64, so float32 results
    match a float64 reference to about 1e-7.  A sample whose float64 power sum
    leaves the range where it is exact (L2 of float64 data beyond about 1e140
    or below 1e-140, any other ``p`` at its own range) gets its norm from the
    core's rescaling rule (``robust_norm``: ``max|x| * ||x / max|x|||_p``), so
    gradients of 1e200 have the finite norm they should, not inf (and
    factor 0); only such samples pay the two extra passes over their rows.

    On the GPU route (CuPy arrays, CUDA tensors) the kernels run on the
    current stream (torch's for tensors, CuPy's for CuPy arrays); ``grads``
    and ``norms`` are device arrays and nothing waits for the device except
    ``n_clipped``: it is counted on the device and read back once, at the end
    of the call after every kernel has been queued (one synchronisation per
    call, like ``.item()``).  The GPU kernels' block size is
    ``fastclip._config.GPU_BLOCK``.

    References
    ----------
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
    https://arxiv.org/abs/1607.00133

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip import clip_per_sample  # exported as fastclip.clip_per_sample
    >>> g = np.array([[3.0, 4.0], [0.3, 0.4]], dtype=np.float32)  # 2 samples
    >>> res = clip_per_sample(g, max_norm=1.0, eps=0.0)
    >>> res.grads
    array([0.90000004, 1.2       ], dtype=float32)
    >>> res.norms
    array([5. , 0.5], dtype=float32)
    >>> res.n_clipped
    1
    >>> summed, norms, n = clip_per_sample([g, g[:, :1]], 1.0, per_layer=True, eps=0)
    >>> norms
    array([[5. , 0.5],
           [3. , 0.3]], dtype=float32)
    >>> clip_per_sample([g, g[:, :1]], 1.0, per_layer=True, eps=0).n_clipped_per_layer
    (1, 1)
    >>> empty = clip_per_sample(np.zeros((0, 2), np.float32), 1.0)  # a Poisson batch of 0
    >>> empty.grads, empty.norms.shape, empty.n_clipped
    (array([0., 0.], dtype=float32), (0,), 0)
    """
    single = hasattr(grads, "shape") and hasattr(grads, "dtype")
    items = _dispatch.as_array_list(grads)
    if not items:
        raise ValueError("clip_per_sample needs at least one array")
    batch = _check_batch(items)
    ord_code, p = check_ord(ord)
    per_layer = bool(per_layer)
    bounds: Any = _check_bounds(max_norm, per_layer, len(items))
    if not (reduce is None or (isinstance(reduce, str) and reduce in _REDUCES)):
        raise ValueError(f"reduce must be 'sum', 'mean' or None, got {reduce!r}")
    eps_value = check_eps(eps)
    backend = _dispatch.backend_for(items, defer_numpy=False)  # no packing: check all here
    if _dispatch.is_dask_array(bounds):  # TypeError unless dask arrays; else stays lazy
        bounds = backend.scalar_arg(max_norm, "max_norm")
    elif isinstance(bounds, list):  # holds dask scalars: TypeError unless dask arrays
        for k, v in enumerate(bounds):
            backend.scalar_arg(v, f"max_norm[{k}]")
    outs, norms, n_clipped = backend.clip_per_sample(
        items,
        batch,
        ord_code,
        p,
        bounds=bounds,
        per_layer=per_layer,
        reduce=reduce,
        eps=eps_value,
    )
    result = PerSampleClipResult(outs[0] if single else outs, norms, n_clipped)
    result.__dict__["_count_spec"] = (bounds, eps_value, per_layer, len(items))
    return result


# ------------------------------------------------------------------ checks


def host_float64(a: Any) -> np.ndarray:
    """A small result array (the norms) as float64 NumPy: an explicit host read."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().to(torch.float64).numpy()
    if type(a).__module__.startswith("cupy"):
        return np.asarray(a.get(), np.float64)
    if isinstance(a, np.ndarray) or type(a).__module__.startswith("dask"):
        return np.asarray(a, np.float64)  # dask: computes the lazy norms
    return np.asarray(np.from_dlpack(a), np.float64)


def _check_batch(items: list[Any]) -> int:
    batch = None
    for i, x in enumerate(items):
        shape = getattr(x, "shape", None)
        if shape is None or not hasattr(x, "dtype"):
            raise TypeError(f"grads[{i}] is not an array: {type(x).__name__}")
        if len(shape) == 0:
            raise ValueError(f"grads[{i}] is 0-d; per-sample gradients have shape [B, ...]")
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise ValueError(
                f"all per-sample arrays need the same batch size: grads[0] has {batch}, "
                f"grads[{i}] has {shape[0]}"
            )
        _check_real_float(x, i)
    if batch is None or not isinstance(batch, int) or batch < 0:
        raise ValueError(
            f"fastclip.clip_per_sample: the batch size (axis 0 of grads) must be a known "
            f"integer >= 0, got {batch!r}"
        )
    return batch


def _check_real_float(x: Any, i: int) -> None:
    dtype = x.dtype
    if isinstance(dtype, np.dtype):
        ok = dtype.kind == "f"
    elif "torch" in sys.modules and isinstance(dtype, sys.modules["torch"].dtype):
        ok = dtype.is_floating_point
    else:
        import array_api_compat as aac

        ok = bool(aac.array_namespace(x).isdtype(dtype, "real floating"))
    if not ok:
        raise TypeError(
            "clip_per_sample needs real floating-point arrays (float16, bfloat16, float32, "
            f"float64); grads[{i}] has dtype {dtype}"
        )


def _check_bounds(max_norm: Any, per_layer: bool, n: int) -> Any:
    """One float64 bound per array; a dask ``max_norm`` is returned as it is, its
    structure checked here and its dtype and values on the Dask route (its graph)."""
    lazy = _dispatch.is_dask_array(max_norm)
    if isinstance(max_norm, (list, tuple)) or (
        getattr(max_norm, "shape", None) is not None and len(max_norm.shape) == 1
    ):
        values = None if lazy else list(max_norm)
        given = max_norm.shape[0] if values is None else len(values)
        if lazy and math.isnan(given):
            raise ValueError(
                "max_norm is a dask array of unknown length (NaN chunk sizes, e.g. after "
                "boolean indexing), so its length cannot be checked without computing it; "
                "call max_norm.compute_chunk_sizes() first (or persist it)"
            )
        if not per_layer:
            raise ValueError("one max_norm per array needs per_layer=True")
        if given != n:
            raise ValueError(f"per_layer needs one max_norm, or one per array ({n}), got {given}")
        if lazy:
            return max_norm
        assert values is not None
        if any(_dispatch.is_dask_array(v) for v in values):  # checked in the Dask graph
            return values
        return np.array([check_max_norm(v, f"max_norm[{k}]") for k, v in enumerate(values)])
    if lazy:
        return max_norm
    return np.full(n, check_max_norm(max_norm))
