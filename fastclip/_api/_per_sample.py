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
* Other Array API libraries: a generic path built from ``array_api_compat``
  operations (correct, not fast).
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np

from .. import _dispatch
from .._validate import check_eps, check_max_norm, check_ord

_REDUCES = ("sum", "mean", None)


class PerSampleClipResult(NamedTuple):
    """What :func:`clip_per_sample` returns (a named tuple: unpack or use the names).

    Attributes
    ----------
    grads : array or list of arrays
        ``reduce="sum"``: ``sum_b f_b g[b]`` of each input, shape ``g.shape[1:]``;
        ``"mean"``: that divided by B; ``None``: the clipped per-sample arrays
        (new arrays, shape ``g.shape``).  Same library and dtype as the inputs; a
        single array when a single array was passed, else a list.
    norms : array
        Per-sample norms before clipping, in the inputs' library: shape ``[B]``
        (flat clipping) or ``[n_arrays, B]`` (``per_layer=True``); float64 if
        any input is float64, else float32.
    n_clipped : int
        Samples whose factor is below 1 (with ``per_layer=True``: samples with
        at least one array clipped).
    """

    grads: Any
    norms: Any
    n_clipped: int


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
        Per-sample gradients, each of shape ``[B, ...]`` with the same ``B >= 1``;
        real floating dtypes (float16, bfloat16, float32, float64), all from one
        library and device.
    max_norm : float, or sequence of floats with ``per_layer=True``
        The bound ``C >= 0`` (``inf``: no clipping); with ``per_layer=True``
        either one number for every array or one per array.
    ord : float, default 2
        Any real ``p > 0`` or ``inf`` (also ``"inf"``).
    per_layer : bool, default False
        Clip each array's per-sample slice separately (Opacus per-layer)
        instead of all arrays of a sample together (flat).
    reduce : {"sum", "mean", None}, default "sum"
        Reduction over the batch axis; ``None`` returns the clipped
        per-sample arrays.
    eps : float, default 1e-6
        Added to the norm in the factor (Opacus uses 1e-6; optax uses 0).

    Returns
    -------
    PerSampleClipResult
        ``(grads, norms, n_clipped)``; see :class:`PerSampleClipResult`.

    Raises
    ------
    ValueError
        Arrays of rank 0, different batch sizes, ``B == 0``, an empty list,
        negative or NaN ``max_norm``, a ``max_norm`` list of the wrong length
        (or given without ``per_layer``), an unknown ``reduce``, a bad ``ord``
        or ``eps``.  Raised before any work.
    TypeError
        Integer, bool or complex arrays; mixed libraries or devices (also CPU
        and CUDA tensors in one call, or CuPy arrays on two devices).
    GPUUnavailableError
        CuPy arrays or CUDA tensors where CuPy is missing or sees no device.

    Notes
    -----
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
    """
    single = hasattr(grads, "shape") and hasattr(grads, "dtype")
    items = _dispatch.as_array_list(grads)
    if not items:
        raise ValueError("clip_per_sample needs at least one array")
    batch = _check_batch(items)
    ord_code, p = check_ord(ord)
    per_layer = bool(per_layer)
    bounds = _check_bounds(max_norm, per_layer, len(items))
    if not (reduce is None or (isinstance(reduce, str) and reduce in _REDUCES)):
        raise ValueError(f"reduce must be 'sum', 'mean' or None, got {reduce!r}")
    eps_value = check_eps(eps)
    backend = _dispatch.backend_for(items, defer_numpy=False)  # no packing: check all here
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
    return PerSampleClipResult(outs[0] if single else outs, norms, n_clipped)


# ------------------------------------------------------------------ checks


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
    if batch is None or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"the batch size must be a known integer >= 1, got {batch!r}")
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


def _check_bounds(max_norm: Any, per_layer: bool, n: int) -> np.ndarray:
    """One float64 bound per array."""
    if isinstance(max_norm, (list, tuple)) or (
        getattr(max_norm, "shape", None) is not None and len(max_norm.shape) == 1
    ):
        values = list(max_norm)
        if not per_layer:
            raise ValueError("one max_norm per array needs per_layer=True")
        if len(values) != n:
            raise ValueError(
                f"per_layer needs one max_norm, or one per array ({n}), got {len(values)}"
            )
        return np.array([check_max_norm(v, f"max_norm[{k}]") for k, v in enumerate(values)])
    return np.full(n, check_max_norm(max_norm))
