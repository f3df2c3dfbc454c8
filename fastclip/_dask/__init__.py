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
  ``NonFiniteNormError`` before anything is rebound: the one computing call.
* Dask-valued arguments (``min``/``max``, ``max_norm``, ``total_norm``,
  ``factor``; ``threshold`` and ``clip_norm`` of the peers' clips, through
  ``Backend.lazy_bound`` and ``checked_bound``; ``clip_per_sample``'s ``max_norm``,
  a list of per-array bounds holding dask scalars included) stay lazy: their
  shapes and dtypes are checked at the call, their values (``max_norm >= 0``,
  no NaN, ``min <= max``) inside the graph, raising
  the NumPy route's ValueError with its message at compute time
  (``fastclip._dask._checks``).  A dask bound of unknown length (NaN chunk
  sizes) is a ValueError at the call that says so and names
  ``compute_chunk_sizes()``.  An array object passed twice to an in-place
  call is refused at the call, as NumPy refuses arrays that share memory.
* ``clip_per_sample`` is a graph too (``fastclip._dask._per_sample``); its
  ``n_clipped`` is a lazy 0-d int64 dask array.

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

from .._errors import nonfinite_error
from ._blocks import (
    FLOATS,
    clip_block,
    coefficients,
    out_dtype,
    refuse_dtype,
    scale_block,
)
from ._checks import (
    check_distinct,
    checked,
    checked_bounds,
    checked_max_norm,
    checked_scalar,
    lazy_scalar,
    scalar_rule,
)
from ._graphs import all_axes, global_norm64, reduce
from ._per_sample import clip_per_sample

__all__ = [
    "DaskLib",
    "check_known_chunks",
    "check_targets",
    "checked_bound",
    "clamp_many_",
    "clip_by_value",
    "clip_global",
    "clip_per_sample",
    "global_norm",
    "norm",
    "rescale",
    "scale_",
]


class DaskLib:
    """The ``lib`` handle of the Dask route (mirrors the CPU driver's adapters)."""

    name = "dask"

    @staticmethod
    def is_float(x: Any) -> bool:
        return np.dtype(x.dtype) in FLOATS


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
    if dt.kind in "fc" and dt not in FLOATS:  # byte-swapped or long double
        refuse_dtype(dt)
    if dt not in FLOATS:
        raise TypeError(
            f"{what} needs floating-point arrays (float16, float32, float64"
            f"{', complex' if what == 'norm' else ''}); got {x.dtype}"
        )


def _checked(arrays: list[Any], what: str) -> None:
    for a in arrays:
        check_known_chunks(a)
    for a in arrays:
        _check_float(a, what)


# --------------------------------------------------------------- the route


def norm(
    lib: Any, x: Any, ord_code: int, p: float, axes: tuple[int, ...] | None, keepdims: bool
) -> Any:
    _checked([x], "norm")
    values = reduce(x, ord_code, p, all_axes(x, axes), keepdims, root=True)
    return values.astype(out_dtype(x))


def _global_dtype(arrays: list[Any]) -> np.dtype:
    wide = any(out_dtype(a) == np.float64 for a in arrays)
    return np.dtype(np.float64) if wide else np.dtype(np.float32)


def global_norm(
    lib: Any, arrays: list[Any], ord_code: int, p: float, per_array: bool = False
) -> Any:
    _checked(arrays, "norm")
    dtype = _global_dtype(arrays)
    if per_array:
        total, per = global_norm64(arrays, ord_code, p, True)
        return total.astype(dtype), per.astype(dtype)
    return global_norm64(arrays, ord_code, p).astype(dtype)


def _scaled(x: Any, coef: Any, axes: tuple[int, ...] | None) -> Any:
    """Lazy ``x * coef`` with the CPU scale kernels; ``coef`` a float64 dask array, or
    a pair of them (the two factors of ``_coefficient_of``)."""
    import dask.array as da

    return da.map_blocks(
        scale_block,
        x,
        *(coef if isinstance(coef, tuple) else (coef,)),
        axes=axes,
        dtype=x.dtype,
        meta=np.empty((0,) * x.ndim, x.dtype),
        token="fastclip-scale",
    )


def _coefficient_of(norms64: Any, max_norm: Any, eps: float, mode: str) -> tuple[Any, Any]:
    """The coefficients as two lazy factors (``fastclip._formulas.coefficient_parts``);
    ``max_norm`` a number or a (checked) float64 dask array broadcasting to the norms."""
    import dask.array as da

    bound: tuple[Any, ...] = ()
    if isinstance(max_norm, da.Array):
        c = max_norm.astype(np.float64)
        if c.ndim:  # per-slice bounds: laid out as the (small) keepdims norms
            c = da.broadcast_to(c, norms64.shape).rechunk(norms64.chunks)
        bound, max_norm = (c,), None
    return tuple(  # type: ignore[return-value]
        da.map_blocks(
            _coefficients,
            norms64,
            *bound,
            max_norm=max_norm,
            eps=eps,
            mode=mode,
            part=part,
            dtype=np.float64,
            meta=np.empty((0,) * norms64.ndim, np.float64),
            token=f"fastclip-coefficient-{part}",
        )
        for part in (0, 1)
    )


def _coefficients(norms: np.ndarray, *bound: np.ndarray, max_norm: Any, **kw: Any) -> np.ndarray:
    """``coefficients`` with a bound given as a block (a dask ``max_norm``) or a number."""
    c: Any = bound[0] if bound else max_norm
    return coefficients(norms, c, **kw)


def _scalar64(value: Any, name: str) -> Any:
    """A given norm or factor (a number or a size-1 real array) as a 0-d float64 dask
    array; the NumPy route's TypeError for any other shape or dtype."""
    import dask.array as da

    if isinstance(value, da.Array):
        return lazy_scalar(value, name)
    return da.asarray(np.float64(value))


def checked_bound(lib: Any, value: Any, fn: str, name: str) -> Any:
    """A size-1 dask bound of ``fastclip.fn`` (``threshold`` of ``clip_by_block_rms``,
    ``clip_norm`` of ``clip_by_average_norm``) as a 0-d float64 dask array whose
    ``check_max_norm`` rule raises the NumPy route's ValueError, naming ``fn`` and
    ``name``, when computed; the shape and dtype TypeErrors now."""
    return checked_scalar(fn, name, value)


def check_targets(lib: Any, arrays: list[Any], what: str) -> None:
    """What an in-place call checks before it rebinds anything (nothing is computed):
    known chunk sizes and no array object passed twice."""
    for a in arrays:
        check_known_chunks(a)
    check_distinct(arrays)


def _rebind(x: Any, value: Any) -> None:
    if x.size == 0:  # nothing to rebind (dask 2026.8 refuses x[...] = v: "shape mismatch")
        return
    x[...] = value  # dask's __setitem__: x now refers to the new graph


def rescale(
    lib: Any,
    x: Any,
    ord_code: int,
    p: float,
    axes: tuple[int, ...] | None,
    max_norm: Any,
    eps: float,
    mode: str,
    inplace: bool,
) -> tuple[Any, Any]:
    what = "clip_by_norm" if mode == "clip" else "normalize"
    _checked([x], what)
    if is_lazy(max_norm):  # a dask bound: its value rules are checked in the graph
        max_norm = checked_max_norm(what + "_" * inplace, max_norm)
    whole = axes is None or len(axes) == x.ndim
    reduce_axes = all_axes(x, axes)
    norms64 = reduce(x, ord_code, p, reduce_axes, True, root=True)
    coef = _coefficient_of(norms64, max_norm, eps, mode)
    out = _scaled(x, coef, None if whole else reduce_axes)
    kept = tuple(s for i, s in enumerate(x.shape) if i not in reduce_axes)
    norms = norms64.reshape(kept).astype(out_dtype(x))
    if inplace:
        _rebind(x, out)
        out = x
    return out, norms


def clip_global(
    lib: Any,
    arrays: list[Any],
    max_norm: float,
    ord_code: int,
    p: float,
    eps: float,
    total_norm: Any,
    error_if_nonfinite: bool,
    inplace: bool,
    per_array: bool = False,
) -> tuple[Any, ...]:
    import dask.array as da

    _checked(arrays, "clip_by_global_norm")
    what = "clip_by_global_norm" + "_" * inplace
    if inplace:
        check_distinct(arrays)
    if is_lazy(max_norm):  # checked as given: NumPy's message shows its dtype and shape
        max_norm = checked_scalar(what, "max_norm", max_norm)
    dtype = _global_dtype(arrays)
    per64 = None
    if total_norm is None and (per_array or error_if_nonfinite):
        norm64, per64 = global_norm64(arrays, ord_code, p, True)
    elif total_norm is None:
        norm64 = global_norm64(arrays, ord_code, p)
    else:
        norm64 = checked(
            _scalar64(total_norm, "total_norm"), *scalar_rule(what, "total_norm", "total_norm")
        )
        if per_array:
            per64 = global_norm64(arrays, ord_code, p, True)[1]
    if error_if_nonfinite:
        # The error must come before anything is returned or rebound: compute the norm
        # now (with the per-array norms of the same graph, for the error's indices).
        import dask

        if per64 is None:  # a given total: the per-array norms are computed only to report
            per64 = global_norm64(arrays, ord_code, p, True)[1]
        value_a, per_a = dask.compute(norm64, per64)
        value = float(value_a)
        if not math.isfinite(value):
            raise nonfinite_error(value, np.flatnonzero(~np.isfinite(per_a)).tolist())
        norm64 = da.asarray(np.float64(value))
        per64 = da.asarray(per_a)
    coef = _coefficient_of(norm64, max_norm, eps, "clip")
    outs = [_scaled(a, coef, None) for a in arrays]
    if inplace:
        for a, o in zip(arrays, outs):
            _rebind(a, o)
        outs = list(arrays)
    if per_array:
        assert per64 is not None
        return outs, norm64.astype(dtype), per64.astype(dtype)
    return outs, norm64.astype(dtype)


def clip_by_value(lib: Any, x: Any, lo: Any, hi: Any, inplace: bool) -> Any:
    """``lo``/``hi``: numbers (validated), or dask arrays broadcasting to ``x``
    (``fastclip._api._bounds`` checked their shapes and dtypes; their values are
    checked here, in the graph)."""
    import dask.array as da

    check_known_chunks(x)
    if is_lazy(lo) or is_lazy(hi):
        return _clip_by_lazy_bounds(x, lo, hi, inplace)
    dtype = np.dtype(x.dtype)
    if dtype.kind == "c":
        raise TypeError("clip_by_value is not defined for complex arrays (they have no order)")
    if dtype.kind not in "fiub":
        raise TypeError(f"clip_by_value needs a real numeric or bool array, got {dtype}")
    if not dtype.isnative or (dtype.kind == "f" and dtype not in FLOATS):
        refuse_dtype(dtype)  # at graph construction, not deep inside compute()
    out = da.map_blocks(
        clip_block,
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


def is_lazy(value: Any) -> bool:
    return type(value).__module__.startswith("dask")


def _clip_by_lazy_bounds(x: Any, lo: Any, hi: Any, inplace: bool) -> Any:
    import dask.array as da

    _check_float(x, "clip_by_value")
    lo, hi = checked_bounds("clip_by_value" + "_" * inplace, lo, hi)
    # Bounds rounded to x's dtype first (as fastclip._api._bounds): rounding is
    # monotonic and x's values are representable, so this equals a float64 clamp.
    lo, hi = (None if b is None else da.asarray(b).astype(x.dtype) for b in (lo, hi))
    out = da.clip(x, lo, hi)
    if inplace:
        _rebind(x, out)
        return x
    return out


def clamp_many_(lib: Any, arrays: list[Any], lo: float | None, hi: float | None) -> None:
    check_targets(lib, arrays, "clip_by_value_")
    for a in arrays:
        clip_by_value(lib, a, lo, hi, True)


def scale_(lib: Any, arrays: list[Any], factor: Any) -> None:
    _checked(arrays, "scale")
    check_distinct(arrays)
    coef = _scalar64(factor, "factor")
    outs = [_scaled(a, coef, None) for a in arrays]
    for a, o in zip(arrays, outs):
        _rebind(a, o)
