"""Per-sample gradient clipping for DP-SGD: ``clip_per_sample``.

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

import math
import sys
from typing import Any, NamedTuple

import numpy as np

from . import _dispatch
from ._formulas import SAFE_HI, SAFE_LO, clip_coefficients, needs_rescale, robust_norm, root
from ._validate import check_eps, check_max_norm, check_ord

__all__ = ["PerSampleClipResult", "clip_per_sample"]

_REDUCES = ("sum", "mean", None)

#: Columns per parallel work item of the fused weighted sum (pass 2).  Measured on
#: the 2-core machine, B=256 x 1.07M float32 (pass 2 alone, ms): tile 1,024 41,
#: 4,096 35, 8,192 34 (the read floor), 16,384 33; 64 KiB row segments stream well.
COL_TILE = 8_192
#: Rows added in the float32 accumulator before flushing into float64.
ROW_BLOCK = 64


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
    call, like ``.item()``).

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
    pcode, p = check_ord(ord)
    per_layer = bool(per_layer)
    bounds = _check_bounds(max_norm, per_layer, len(items))
    if not (reduce is None or (isinstance(reduce, str) and reduce in _REDUCES)):
        raise ValueError(f"reduce must be 'sum', 'mean' or None, got {reduce!r}")
    eps_value = check_eps(eps)
    route = _dispatch.route_of_many(items)
    if route == _dispatch.ROUTE_GPU:
        # CUDA kernels on the caller's stream; reads n_clipped back once, at the end
        _dispatch.check_gpu_available()
        from ._gpu import _per_sample as gpu_per_sample
        from ._gpu._libs import lib_for as gpu_lib_for

        outs, norms, n_clipped = gpu_per_sample.clip_per_sample_gpu(
            gpu_lib_for(_dispatch.library_of(items[0])),
            items,
            batch,
            pcode,
            p,
            bounds,
            per_layer,
            reduce,
            eps_value,
        )
    elif route == _dispatch.ROUTE_CPU:
        from ._cpu import lib_for

        lib = lib_for(_dispatch.library_of(items[0]))
        _check_cpu_items(lib, items)
        outs, norms, n_clipped = _cpu_path(
            lib, items, batch, pcode, p, bounds, per_layer, reduce, eps_value
        )
    else:
        outs, norms, n_clipped = _generic_path(
            items, batch, pcode, p, bounds, per_layer, reduce, eps_value
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


def _check_cpu_items(lib: Any, items: list[Any]) -> None:
    if lib.name == "torch":
        for x in items:
            if x.device.type != "cpu":
                raise TypeError(
                    f"all tensors in one call must be on one device, got cpu and {x.device}"
                )


# ------------------------------------------------------------- shared maths


def _norms_and_factors(
    sums: np.ndarray,
    pcode: int,
    p: float,
    bounds: np.ndarray,
    per_layer: bool,
    eps: float,
    fix: Any = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """[n, B] power sums -> norms ([B] or [n, B]), factors [n, B], count clipped.

    ``fix(norms, totals)``, if given, replaces in place the norms of samples whose
    power sums over/underflowed (``_robust_norms``).
    """
    if per_layer:
        norms = root(sums, pcode, p)
        if fix is not None:
            fix(norms, sums)
        factors = clip_coefficients(norms, bounds[:, None], eps)
        clipped = int(np.count_nonzero((factors < 1.0).any(axis=0)))
        return norms, factors, clipped
    total = _combine(sums, pcode)
    norms = root(total, pcode, p)
    if fix is not None:
        fix(norms, total)
    f = clip_coefficients(norms, bounds[0], eps)
    return norms, np.broadcast_to(f, sums.shape), int(np.count_nonzero(f < 1.0))


def _combine(values: Any, pcode: int) -> Any:
    """Power sums of the parts of a sample (axis 0) -> the sample's: max for inf, else sum."""
    return np.max(values, axis=0) if pcode == 0 else np.sum(values, axis=0)


def _robust_norms(
    pcode: int, p: float, wide: bool, per_layer: bool, n_arrays: int, rows_pow_sum: Any
) -> Any:
    """A ``fix`` for ``_norms_and_factors``: the core's ``robust_norm`` rule per sample.

    ``rows_pow_sum(k, rows, pc, pp, inv)`` gives the power sums of rows
    ``rows`` (int64 indices) of array ``k``, row ``rows[i]`` scaled by
    ``inv[i]``.  Only samples outside the range where the float64 power sum
    is exact are looked at again, so the common case costs one vectorised
    range test.  Their max |x| comes from one call per array; a max of 0
    (all zeros), NaN or inf already has its exact norm from pass 1 (0, NaN,
    inf), and every other such sample gets ``robust_norm`` itself (one rule
    for every route).  None when ``pcode`` and the dtypes cannot leave the
    range (float32 L1/L2, the max-norm).
    """

    if not needs_rescale(pcode, wide):
        return None

    def fix(norms: np.ndarray, totals: np.ndarray) -> None:
        with np.errstate(invalid="ignore"):
            bad = ~((totals > SAFE_LO) & (totals < SAFE_HI))
        if not bad.any():
            return
        maxes = np.zeros(totals.shape)
        if per_layer:
            for k in range(n_arrays):
                rows = np.flatnonzero(bad[k])
                if rows.size:
                    maxes[k, rows] = rows_pow_sum(k, rows, 0, p, np.ones(rows.size))
        else:
            rows = np.flatnonzero(bad)
            parts = [rows_pow_sum(k, rows, 0, p, np.ones(rows.size)) for k in range(n_arrays)]
            maxes[rows] = _combine(np.array(parts), 0)
        with np.errstate(invalid="ignore"):
            finite_nonzero = bad & (maxes > 0.0) & (maxes < math.inf)
        for index in zip(*np.nonzero(finite_nonzero)):
            parts_k = (int(index[0]),) if per_layer else tuple(range(n_arrays))
            # what robust_norm asks first was already computed: no second pass for them
            known = {(pcode, p, 1.0): float(totals[index]), (0, p, 1.0): float(maxes[index])}
            pow_sum = _sample_pow_sum(rows_pow_sum, parts_k, int(index[-1]), known)
            norms[index] = robust_norm(pow_sum, pcode, p, wide)

    return fix


def _sample_pow_sum(rows_pow_sum: Any, parts: tuple[int, ...], b: int, known: dict) -> Any:
    """``robust_norm``'s ``pow_sum(pc, pp, inv)`` for sample ``b`` over arrays ``parts``."""
    row = np.array([b], np.int64)

    def pow_sum(pc: int, pp: float, inv: float) -> float:
        key = (pc, pp, inv)
        if key not in known:
            values = [float(rows_pow_sum(k, row, pc, pp, np.full(1, inv))[0]) for k in parts]
            known[key] = float(_combine(np.array(values, np.float64), pc))
        return float(known[key])

    return pow_sum


# ----------------------------------------------------------------- CPU path


def _new(lib: Any, like: Any, shape: tuple[int, ...]) -> Any:
    if lib.name == "torch":
        return sys.modules["torch"].empty(shape, dtype=like.dtype)
    return np.empty(shape, like.dtype)


def _cpu_path(
    lib: Any,
    items: list[Any],
    batch: int,
    pcode: int,
    p: float,
    bounds: np.ndarray,
    per_layer: bool,
    reduce: str | None,
    eps: float,
) -> tuple[list[Any], Any, int]:
    from . import _cpu
    from ._cpu import float_storage, norm_dtype

    views = []
    for x in items:
        sv = float_storage(lib, x, "clip_per_sample")
        width = math.prod(sv.shape[1:])
        views.append(np.ascontiguousarray(sv).reshape(batch, width))  # copies only if strided
    ones = np.ones(batch)
    sums = np.empty((len(views), batch))
    for k, x2 in enumerate(views):
        sums[k] = _cpu.run("rows_pow_sum", x2.size, x2, pcode, p, ones)
    wide = any(norm_dtype(v.dtype) == np.float64 for v in views)

    def rows_pow_sum(k: int, rows: np.ndarray, pc: int, pp: float, inv: np.ndarray) -> Any:
        x2 = views[k]
        if rows.size == 1:
            x2 = x2[rows[0] : rows[0] + 1]
        elif rows.size != x2.shape[0]:  # all rows: no copy
            x2 = x2[rows]
        return _cpu.run("rows_pow_sum", x2.size, x2, pc, pp, inv)

    fix = _robust_norms(pcode, p, wide, per_layer, len(views), rows_pow_sum)
    norms, factors, clipped = _norms_and_factors(sums, pcode, p, bounds, per_layer, eps, fix)
    outs = []
    scale = 1.0 / batch if reduce == "mean" else 1.0
    for k, (x, x2) in enumerate(zip(items, views)):
        f = np.ascontiguousarray(factors[k])
        if reduce is None:
            out = _new(lib, x, tuple(x.shape))
            dst = lib.storage(out).reshape(x2.shape)
            if x2.size:
                _cpu.run("rows_scale", x2.size, x2, dst, f, False)
        else:
            out = _new(lib, x, tuple(x.shape[1:]))
            dst = lib.storage(out).reshape(-1)
            f, out_scale = _factors_in_range(f, scale, wide)
            if x2.size:
                _cpu.run(
                    "weighted_sum",
                    x2.size,
                    x2,
                    f,
                    dst,
                    out_scale,
                    COL_TILE,
                    ROW_BLOCK,
                )
        outs.append(out)
    ndt = np.dtype(np.float64 if wide else np.float32)
    return outs, lib.wrap(norms, ndt, items[0]), clipped


def _factors_in_range(f: np.ndarray, scale: float, wide: bool) -> tuple[np.ndarray, float]:
    """Factors the weighted sum can take in float32, and the float64 output scale.

    The weighted sum multiplies 32- and 16-bit rows by float32 factors; a factor
    below float32's normal range (samples of norm 1e30 clipped to 1e-30: 1e-60)
    would flush to 0 although every product is representable.  Dividing the
    factors by a power of two near their largest, and multiplying the output's
    float64 scale by it, is exact and keeps the largest factors in range.
    """
    if wide or not f.size:
        return f, scale
    top = float(np.max(f))
    if not (0.0 < top < 2.0**-60):  # in range already (or 0, NaN, inf: nothing to gain)
        return f, scale
    _, e = np.frexp(top)
    return np.ldexp(f, -e), scale * math.ldexp(1.0, int(e))


# ------------------------------------------------------------- generic path


def _generic_path(
    items: list[Any],
    batch: int,
    pcode: int,
    p: float,
    bounds: np.ndarray,
    per_layer: bool,
    reduce: str | None,
    eps: float,
) -> tuple[list[Any], Any, int]:
    import array_api_compat as aac

    from . import _generic

    xp = aac.array_namespace(items[0])
    wide = _generic._wide(xp)
    with np.errstate(all="ignore"):  # over/underflow is detected and rescaled below
        flat = [xp.reshape(xp.astype(x, wide), (batch, math.prod(x.shape[1:]))) for x in items]
        sums = [_generic_row_sums(xp, g, pcode, p, wide) for g in flat]
    any_wide = any(x.dtype == xp.float64 for x in items)
    with np.errstate(all="ignore"):
        total = xp.stack(sums)
        if not per_layer:
            total = xp.max(total, axis=0) if pcode == 0 else xp.sum(total, axis=0)
        if pcode == 2:
            norms = xp.sqrt(total)
        elif pcode == 3:
            norms = total ** (1.0 / p)
        else:
            norms = total

        def rows_pow_sum(k: int, rows: np.ndarray, pc: int, pp: float, inv: np.ndarray) -> Any:
            g = xp.take(flat[k], xp.asarray(rows, device=aac.device(flat[k])), axis=0)
            g = g * xp.asarray(inv[:, None], dtype=g.dtype, device=aac.device(g))
            return np.array([float(v) for v in _generic_row_sums(xp, g, pc, pp, g.dtype)])

        fix = _robust_norms(pcode, p, any_wide, per_layer, len(items), rows_pow_sum)
        if fix is not None:
            norms = _fixed_on_host(xp, fix, norms, total, aac.device(items[0]))
        c = xp.asarray(bounds, dtype=wide)
        c = xp.reshape(c, (len(items), 1)) if per_layer else c[0]
        one = xp.ones_like(norms)
        f = clip_coefficients(norms, c, eps, xp=xp)
        below = f < one
        if per_layer:
            below = xp.any(below, axis=0)
        clipped = int(xp.sum(xp.astype(below, xp.int64)))
        outs = []
        for k, (x, g) in enumerate(zip(items, flat)):
            fk = f[k, :] if per_layer else f
            y = g * xp.reshape(fk, (batch, 1))
            if reduce is None:
                outs.append(xp.astype(xp.reshape(y, x.shape), x.dtype))
                continue
            s = xp.sum(y, axis=0)
            if reduce == "mean":
                s = s / batch
            outs.append(xp.astype(xp.reshape(s, x.shape[1:]), x.dtype))
    ndt = xp.float64 if any_wide else xp.float32
    return outs, xp.astype(norms, ndt), clipped


def _generic_row_sums(xp: Any, g: Any, pcode: int, p: float, wide: Any) -> Any:
    """Power sum (or max |x|) of every row of a [B, D] array, in ``wide``."""
    a = xp.abs(g)
    if g.shape[1] == 0:
        return xp.zeros((g.shape[0],), dtype=wide)
    if pcode == 0:
        return xp.max(a, axis=1)
    if pcode == 1:
        return xp.sum(a, axis=1)
    if pcode == 2:
        return xp.sum(a * a, axis=1)
    return xp.sum(a**p, axis=1)


def _fixed_on_host(xp: Any, fix: Any, norms: Any, totals: Any, device: Any) -> Any:
    """``fix`` applied to the generic route's norms: one host read to test the range,
    and only when a sample is out of it, every power sum read back (small: [n, B])."""

    bad = ~((totals > SAFE_LO) & (totals < SAFE_HI))
    if not bool(xp.any(bad)):
        return norms
    shape = tuple(totals.shape)
    host_totals = np.array([float(v) for v in xp.reshape(totals, (-1,))]).reshape(shape)
    host_norms = np.array([float(v) for v in xp.reshape(norms, (-1,))]).reshape(shape)
    fix(host_norms, host_totals)
    return xp.asarray(host_norms, dtype=norms.dtype, device=device)
