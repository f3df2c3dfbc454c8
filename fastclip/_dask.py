"""The Dask route: lazy norms and clipping, chunk by chunk with the Numba kernels.

Every public function accepts ``dask.array.Array`` inputs and returns dask
arrays; nothing is computed until ``.compute()`` (or ``persist``/``store``).
Chunks are NumPy blocks handed to the CPU driver's kernels, so the same code
runs on the threaded scheduler, on processes and on a ``dask.distributed``
cluster, and arrays larger than memory stream through block by block.

* Norms are one ``dask.array.reduction``: each block gives its power sums
  ``sum |x|^p`` (or ``max |x|`` for ``ord=inf``) along the reduction axes with
  ``keepdims``, in float64, from the CPU driver's kernels; partials are summed
  (or maxed, NaN winning) in float64 across chunk boundaries, and the root is
  taken once at the end.  Norm dtypes follow the core: float64 for
  float64/complex128 data, float32 otherwise.
* Clipping is ``map_blocks``: the coefficient ``min(1, c / (norm + eps))``
  (``1 / (norm + eps)`` for normalize) is a lazy float64 array with the norm's
  keepdims shape; each block is multiplied by its slice of it with the CPU
  scale kernels (16-bit data in float32, rounded once).
* "In place" on a dask array means what ``x[...] = value`` means for dask
  (its ``__setitem__``): the same Python object is rebound to the new graph.
  Arrays derived from ``x`` earlier keep the old values (dask arrays are
  values, not memory); the returned norms are computed from the data before
  clipping.  Nothing is computed by the rebinding.
* ``error_if_nonfinite=True`` needs the norm's value before it may return, so
  it computes the global norm (one pass over the data) and raises
  ``NonFiniteNormError`` before anything is rebound.

* Extreme values: where the NumPy route rescales by the maximum (float64 L2,
  any other ``p``), each block's partial is a pair ``(m, s)`` with
  ``sum |x|^p = m^p * s``: ``(1, plain sum)`` when the plain float64 sum is safely
  inside float64's range, else ``(2^-k, sum (|x| 2^k)^p)`` with ``2^-k`` near
  max|x| (two more passes over that block only; a power of two, as ``1 / max|x|``
  overflows for subnormal data).  Pairs combine as ``M = max m``,
  ``S = sum s (m / M)^p`` (LAPACK's scaled ``nrm2`` in spirit), and the norm is
  ``M * S^(1/p)``: float64 data near 1e+-300 gets the same norms as on NumPy.

Limits: a clipped output whose input is not persisted reads (or regenerates)
the input twice, norm then scale.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _config, _cpu
from ._cpu import NumpyLib, norm_dtype, refuse_dtype
from ._errors import NonFiniteNormError, nonfinite_message
from ._formulas import SAFE_HI, SAFE_LO, clip_coefficients, needs_rescale, pow2_inverse, root

_FLOATS = frozenset(
    np.dtype(t) for t in (np.float16, np.float32, np.float64, np.complex64, np.complex128)
)


class DaskLib:
    """The ``lib`` handle of the Dask route (mirrors the CPU driver's adapters)."""

    name = "dask"

    @staticmethod
    def is_float(x: Any) -> bool:
        return np.dtype(x.dtype) in _FLOATS


# ------------------------------------------------------------------ checks


def check_known_chunks(x: Any) -> None:
    """ValueError for arrays whose chunk sizes are unknown (e.g. after ``x[x > 0]``)."""
    if any(math.isnan(c) for dim in x.chunks for c in dim):
        raise ValueError(
            f"fastclip needs dask arrays with known chunk sizes; this one has unknown (NaN) "
            f"chunk sizes (shape {x.shape}), e.g. after boolean indexing. Call "
            f"x.compute_chunk_sizes() first (or x.persist())"
        )


def _check_float(x: Any, what: str) -> None:
    dt = np.dtype(x.dtype)
    if dt.kind in "fc" and dt not in _FLOATS:  # byte-swapped or long double
        refuse_dtype(dt)
    if dt not in _FLOATS:
        raise TypeError(
            f"{what} needs floating-point arrays (float16, float32, float64"
            f"{', complex' if what == 'norm' else ''}); got {x.dtype}"
        )


def _checked(arrays: list[Any], what: str) -> None:
    for a in arrays:
        check_known_chunks(a)
    for a in arrays:
        _check_float(a, what)


def _out_dtype(x: Any) -> np.dtype:
    return norm_dtype(NumpyLib.storage(np.empty(0, x.dtype)).dtype)


# ------------------------------------------------------- block functions


def _block_pow_sums(
    block: np.ndarray, axis: tuple[int, ...], keepdims: bool, pcode: int, p: float, **_: Any
) -> np.ndarray:
    """float64 power sums (max for inf) of one NumPy block along ``axis``, keepdims."""
    sv = NumpyLib.storage(np.asarray(block))
    shape = tuple(1 if i in axis else s for i, s in enumerate(sv.shape))
    if sv.size == 0:
        return np.zeros(shape, np.float64)
    if len(axis) == sv.ndim:
        flat = sv.reshape(-1)
        value = _cpu.run("arr_pow_sum", flat.size, flat, pcode, p, 1.0, _config.CHUNK)
        return np.full(shape, value, np.float64)
    plan = _cpu.AxisPlan(sv, tuple(sorted(axis)))
    return np.asarray(plan.pow_sums(pcode, p), np.float64).reshape(shape)


#: A partial power sum that survives float64 over/underflow: sum |x|^p = m^p * s.
_PAIR = np.dtype([("m", np.float64), ("s", np.float64)])


def _block_pairs(
    block: np.ndarray, axis: tuple[int, ...], keepdims: bool, pcode: int, p: float, **_: Any
) -> np.ndarray:
    """Partial power sums of one block as ``(m, s)`` pairs (see the module notes)."""
    sv = NumpyLib.storage(np.asarray(block))
    shape = tuple(1 if i in axis else s for i, s in enumerate(sv.shape))
    out = np.zeros(shape, _PAIR)
    if sv.size == 0:
        return out  # (0, 0): the identity
    whole = len(axis) == sv.ndim
    flat = sv.reshape(-1) if whole else None
    plan = None if whole else _cpu.AxisPlan(sv, tuple(sorted(axis)))

    def pow_sums(pc: int, inv: np.ndarray | None) -> np.ndarray:
        if plan is not None:
            return np.asarray(plan.pow_sums(pc, p, inv), np.float64).reshape(shape)
        assert flat is not None
        scale = 1.0 if inv is None else float(inv.reshape(-1)[0])
        value = _cpu.run("arr_pow_sum", flat.size, flat, pc, p, scale, _config.CHUNK)
        return np.full(shape, value, np.float64)

    totals = pow_sums(pcode, None)
    m = np.where(totals == 0.0, 0.0, 1.0)
    s = totals
    bad = ~((totals > SAFE_LO) & (totals < SAFE_HI))  # 0 may be underflow
    if bad.any():
        maxes = pow_sums(0, None)
        fix = bad & (maxes > 0.0) & (maxes < math.inf)
        if fix.any():
            # A power-of-two scale, not 1 / max: that overflows for subnormal maxima
            # (see ``_formulas.pow2_inverse``); the pair's m is then 1 / inv, exactly.
            inv = np.where(fix, pow2_inverse(np.where(fix, maxes, 1.0)), 1.0)
            scaled = pow_sums(3, inv.reshape(-1) if plan is not None else inv)
            m = np.where(fix, 1.0 / inv, m)
            s = np.where(fix, scaled, s)
    out["m"] = m
    out["s"] = s
    return out


def _combine_pairs(
    parts: np.ndarray, axis: tuple[int, ...], keepdims: bool, p: float
) -> np.ndarray:
    """Pairs combined along ``axis``: ``M = max m``, ``S = sum s (m / M)^p``."""
    m, s = parts["m"], parts["s"]
    big = np.max(m, axis=axis, keepdims=True)
    with np.errstate(all="ignore"):
        ratio = np.where(big > 0.0, m / np.where(big > 0.0, big, 1.0), 0.0)
        terms = np.where(np.isfinite(s), s * ratio**p, s)  # inf * 0 must stay inf
    out = np.empty(np.sum(terms, axis=axis, keepdims=keepdims).shape, _PAIR)
    out["s"] = np.sum(terms, axis=axis, keepdims=keepdims)
    out["m"] = big if keepdims else np.squeeze(big, axis=axis)
    return out


def _pairs_norm(pairs: np.ndarray, pcode: int, p: float) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(pairs["m"] * root(pairs["s"], 3, p), np.float64)


def _combine_root_pairs(
    parts: np.ndarray,
    axis: tuple[int, ...],
    keepdims: bool,
    pcode: int,
    p: float,
    root: bool,
    **_: Any,
) -> np.ndarray:
    pairs = _combine_pairs(parts, axis, keepdims, p)
    return _pairs_norm(pairs, pcode, p) if root else pairs


def _uses_pairs(arrays: list[Any], pcode: int) -> bool:
    """Pairs where the NumPy route would rescale (float64 L2, any other p)."""
    wide = any(_out_dtype(a) == np.float64 for a in arrays)
    return needs_rescale(pcode, wide)


def _combine(parts: np.ndarray, axis: tuple[int, ...], keepdims: bool, pcode: int) -> np.ndarray:
    if pcode == 0:
        return np.max(parts, axis=axis, keepdims=keepdims)  # NaN propagates
    return np.sum(parts, axis=axis, keepdims=keepdims)


def _aggregate(
    parts: np.ndarray, axis: tuple[int, ...], keepdims: bool, pcode: int, p: float
) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(root(_combine(parts, axis, keepdims, pcode), pcode, p))


def _coefficients(norms: np.ndarray, max_norm: float, eps: float, mode: str) -> np.ndarray:
    return np.asarray(clip_coefficients(norms, max_norm, eps, mode), np.float64)


def _scale_block(block: np.ndarray, coef: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    """``block * coef`` with the CPU scale kernels; ``coef`` is 0-d or keepdims-shaped."""
    block = np.asarray(block)
    out = np.empty(block.shape, block.dtype)
    if block.size == 0:
        return out
    sv, out_sv = NumpyLib.storage(block), NumpyLib.storage(out)
    if axes is None or len(axes) == sv.ndim:
        src = np.ascontiguousarray(sv).reshape(-1)
        value = float(np.asarray(coef).reshape(-1)[0])
        dst = out_sv.reshape(-1)
        _cpu.run("arr_scale", src.size, src, dst, value, False, _config.CHUNK)
        return out
    plan = _cpu.AxisPlan(sv, axes)
    coefs = np.ascontiguousarray(np.broadcast_to(coef, plan_shape(sv.shape, axes)).reshape(-1))
    plan.scale(coefs.astype(np.float64), out_sv)
    return out


def plan_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in axes else s for i, s in enumerate(shape))


def _clip_block(block: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    return np.asarray(_cpu.clip_by_value(NumpyLib, np.asarray(block), lo, hi, False))


# ------------------------------------------------------------- lazy graphs


def _reduce(
    x: Any,
    pcode: int,
    p: float,
    axes: tuple[int, ...],
    keepdims: bool,
    root: bool,
    pairs: bool | None = None,
) -> Any:
    """Lazy float64 norms (``root``) or partial power sums of ``x`` over ``axes``.

    With ``pairs`` (default: where the NumPy route rescales) partials are
    ``(m, s)`` pairs; norms are float64 either way.
    """
    import dask.array as da

    pairs = _uses_pairs([x], pcode) if pairs is None else pairs
    out_ndim = x.ndim if keepdims else x.ndim - len(axes)
    if not pairs:
        return da.reduction(
            x,
            _partial(_block_pow_sums, pcode=pcode, p=p),
            _partial(_combine_root, pcode=pcode, p=p, root=root),
            combine=_partial(_combine_root, pcode=pcode, p=p, root=False),
            axis=axes,
            keepdims=keepdims,
            dtype=np.float64,
            meta=np.empty((0,) * out_ndim, np.float64),
            concatenate=True,
            name="fastclip-norm" if root else "fastclip-pow-sum",
        )
    # dask gives every stage of a reduction one dtype: reduce the pairs, then root them
    partials = da.reduction(
        x,
        _partial(_block_pairs, pcode=pcode, p=p),
        _partial(_combine_root_pairs, pcode=pcode, p=p, root=False),
        combine=_partial(_combine_root_pairs, pcode=pcode, p=p, root=False),
        axis=axes,
        keepdims=keepdims,
        dtype=_PAIR,
        meta=np.empty((0,) * out_ndim, _PAIR),
        concatenate=True,
        name="fastclip-pow-sum-pairs",
    )
    return _rooted(partials, pcode, p) if root else partials


def _rooted(pairs: Any, pcode: int, p: float) -> Any:
    """Lazy float64 norms of lazy ``(m, s)`` pairs."""
    return pairs.map_blocks(
        _pairs_norm,
        pcode=pcode,
        p=p,
        dtype=np.float64,
        meta=np.empty((0,) * pairs.ndim, np.float64),
        token="fastclip-norm-pairs",
    )


def _combine_root(
    parts: np.ndarray,
    axis: tuple[int, ...],
    keepdims: bool,
    pcode: int,
    p: float,
    root: bool,
    **_: Any,
) -> np.ndarray:
    if root:
        return _aggregate(parts, axis, keepdims, pcode, p)
    return _combine(parts, axis, keepdims, pcode)


def _partial(func: Any, **kwargs: Any) -> Any:
    import functools

    return functools.partial(func, **kwargs)


def _all_axes(x: Any, axes: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(range(x.ndim)) if axes is None else axes


# --------------------------------------------------------------- the route


def norm(
    lib: Any, x: Any, pcode: int, p: float, axes: tuple[int, ...] | None, keepdims: bool
) -> Any:
    _checked([x], "norm")
    values = _reduce(x, pcode, p, _all_axes(x, axes), keepdims, root=True)
    return values.astype(_out_dtype(x))


def _global_norm64(arrays: list[Any], pcode: int, p: float) -> Any:
    import dask.array as da

    pairs = _uses_pairs(arrays, pcode)
    parts = [_reduce(a, pcode, p, _all_axes(a, None), False, False, pairs) for a in arrays]
    stacked = da.stack(parts) if len(parts) > 1 else parts[0][None]
    if pairs:
        total = da.reduction(
            stacked,
            _partial(_combine_root_pairs, pcode=pcode, p=p, root=False),
            _partial(_combine_root_pairs, pcode=pcode, p=p, root=False),
            combine=_partial(_combine_root_pairs, pcode=pcode, p=p, root=False),
            axis=(0,),
            keepdims=False,
            dtype=_PAIR,
            meta=np.empty((), _PAIR),
            concatenate=True,
            name="fastclip-global-pairs",
        )
        return _rooted(total, pcode, p)
    return da.reduction(
        stacked,
        _partial(_combine_root, pcode=pcode, p=p, root=False),
        _partial(_combine_root, pcode=pcode, p=p, root=True),
        combine=_partial(_combine_root, pcode=pcode, p=p, root=False),
        axis=(0,),
        keepdims=False,
        dtype=np.float64,
        meta=np.empty((), np.float64),
        concatenate=True,
        name="fastclip-global-norm",
    )


def _global_dtype(arrays: list[Any]) -> np.dtype:
    wide = any(_out_dtype(a) == np.float64 for a in arrays)
    return np.dtype(np.float64) if wide else np.dtype(np.float32)


def global_norm(lib: Any, arrays: list[Any], pcode: int, p: float) -> Any:
    _checked(arrays, "norm")
    return _global_norm64(arrays, pcode, p).astype(_global_dtype(arrays))


def _scaled(x: Any, coef: Any, axes: tuple[int, ...] | None) -> Any:
    """Lazy ``x * coef`` with the CPU scale kernels; ``coef`` a float64 dask array."""
    import dask.array as da

    return da.map_blocks(
        _scale_block,
        x,
        coef,
        axes=axes,
        dtype=x.dtype,
        meta=np.empty((0,) * x.ndim, x.dtype),
        token="fastclip-scale",
    )


def _coefficient_of(norms64: Any, max_norm: float, eps: float, mode: str) -> Any:
    return norms64.map_blocks(
        _coefficients,
        max_norm=max_norm,
        eps=eps,
        mode=mode,
        dtype=np.float64,
        meta=np.empty((0,) * norms64.ndim, np.float64),
        token="fastclip-coefficient",
    )


def _rebind(x: Any, value: Any) -> None:
    x[...] = value  # dask's __setitem__: x now refers to the new graph


def rescale(
    lib: Any,
    x: Any,
    pcode: int,
    p: float,
    axes: tuple[int, ...] | None,
    max_norm: float,
    eps: float,
    mode: str,
    inplace: bool,
) -> tuple[Any, Any]:
    what = "clip_by_norm" if mode == "clip" else "normalize"
    _checked([x], what)
    whole = axes is None or len(axes) == x.ndim
    reduce_axes = _all_axes(x, axes)
    norms64 = _reduce(x, pcode, p, reduce_axes, True, root=True)
    coef = _coefficient_of(norms64, max_norm, eps, mode)
    out = _scaled(x, coef, None if whole else reduce_axes)
    kept = tuple(s for i, s in enumerate(x.shape) if i not in reduce_axes)
    norms = norms64.reshape(kept).astype(_out_dtype(x))
    if inplace:
        _rebind(x, out)
        out = x
    return out, norms


def clip_global(
    lib: Any,
    arrays: list[Any],
    max_norm: float,
    pcode: int,
    p: float,
    eps: float,
    total_norm: Any,
    error_if_nonfinite: bool,
    inplace: bool,
) -> tuple[list[Any], Any]:
    import dask.array as da

    _checked(arrays, "clip_by_global_norm")
    dtype = _global_dtype(arrays)
    if total_norm is None:
        norm64 = _global_norm64(arrays, pcode, p)
    else:
        norm64 = da.asarray(total_norm).astype(np.float64)
        if norm64.ndim != 0:
            norm64 = norm64.reshape(())
    if error_if_nonfinite:
        # The error must come before anything is returned or rebound: compute the norm now.
        value = float(norm64.compute())
        if not math.isfinite(value):
            raise NonFiniteNormError(nonfinite_message(value))
        norm64 = da.asarray(np.float64(value))
    coef = _coefficient_of(norm64, max_norm, eps, "clip")
    outs = [_scaled(a, coef, None) for a in arrays]
    if inplace:
        for a, o in zip(arrays, outs):
            _rebind(a, o)
        outs = list(arrays)
    return outs, norm64.astype(dtype)


def clip_by_value(lib: Any, x: Any, lo: float | None, hi: float | None, inplace: bool) -> Any:
    import dask.array as da

    check_known_chunks(x)
    dtype = np.dtype(x.dtype)
    if dtype.kind == "c":
        raise TypeError("clip_by_value is not defined for complex arrays (they have no order)")
    if dtype.kind not in "fiub":
        raise TypeError(f"clip_by_value needs a real numeric or bool array, got {dtype}")
    if not dtype.isnative or (dtype.kind == "f" and dtype not in _FLOATS):
        refuse_dtype(dtype)  # at graph construction, not deep inside compute()
    out = da.map_blocks(
        _clip_block,
        x,
        lo=lo,
        hi=hi,
        dtype=dtype,
        meta=np.empty((0,) * x.ndim, dtype),
        token="fastclip-clip-value",
    )
    if inplace:
        _rebind(x, out)
        return x
    return out


def clamp_many_(lib: Any, arrays: list[Any], lo: float | None, hi: float | None) -> None:
    for a in arrays:
        check_known_chunks(a)
    for a in arrays:
        clip_by_value(lib, a, lo, hi, True)


def scale_(lib: Any, arrays: list[Any], factor: Any) -> None:
    import dask.array as da

    _checked(arrays, "scale")
    coef = da.asarray(factor).astype(np.float64)
    if coef.ndim != 0:
        coef = coef.reshape(())
    outs = [_scaled(a, coef, None) for a in arrays]
    for a, o in zip(arrays, outs):
        _rebind(a, o)
