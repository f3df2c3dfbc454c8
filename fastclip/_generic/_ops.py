"""The generic route's operations: pure Array API code for every other library.

array-api-strict, JAX, Dask, torch on non-CPU/CUDA devices, ... all come here
through ``array_api_compat.array_namespace``.  Sums are taken in float64 where
the namespace has it (so float32 data keeps the same 1e-7 accuracy as the
Numba route and squares of |x| ~ 1e20 cannot overflow), in float32 otherwise.
Results are created in the input's namespace and on its device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat as aac

from .._errors import nonfinite_error, out_of_place_hint
from .._formulas import SAFE_HI, SAFE_LO, coefficient_parts, int_bound
from .._libraries import wide_dtype


def _xp(x: Any) -> Any:
    return aac.array_namespace(x)


def _quiet(func: Any) -> Any:
    """Run ``func`` without NumPy floating-point warnings.

    NaN and inf norms propagate by design (NaN outputs, ``inf * 0``); libraries
    built on NumPy (array-api-strict) would otherwise warn where the Numba and
    torch routes are silent.
    """
    import functools

    import numpy as np

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(all="ignore"):
            return func(*args, **kwargs)

    return wrapper


def _is_float(xp: Any, x: Any) -> bool:
    return bool(xp.isdtype(x.dtype, ("real floating", "complex floating")))


def _norm_dtype(xp: Any, x: Any) -> Any:
    wide = x.dtype in (xp.float64, getattr(xp, "complex128", None))
    return xp.float64 if wide else xp.float32


def _check_float(xp: Any, x: Any, what: str) -> None:
    if not _is_float(xp, x):
        raise TypeError(f"{what} needs floating-point arrays, got {x.dtype}")


def _pow_sum(xp: Any, x: Any, ord_code: int, p: float, axes: tuple[int, ...] | None) -> Any:
    """sum |x|**p (or max |x|) over ``axes`` in the wide dtype."""
    a = xp.astype(xp.abs(x), wide_dtype(xp))
    if ord_code == 0:
        if math.prod(x.shape) == 0:
            return xp.sum(a, axis=axes)  # zeros of the reduced shape
        m = xp.max(a, axis=axes)
        # max() may drop NaN in some libraries: make NaN win explicitly.
        has_nan = xp.any(xp.isnan(a), axis=axes)
        return xp.where(has_nan, xp.asarray(math.nan, dtype=m.dtype, device=aac.device(x)), m)
    if ord_code == 2:
        return xp.sum(a * a, axis=axes)
    if ord_code == 1:
        return xp.sum(a, axis=axes)
    return xp.sum(a**p, axis=axes)


def _root(xp: Any, total: Any, ord_code: int, p: float) -> Any:
    if ord_code in (0, 1):
        return total
    if ord_code == 2:
        return xp.sqrt(total)
    return total ** (1.0 / p)


# Power sums outside (SAFE_LO, SAFE_HI) may have lost precision to float64 under-
# or overflow; the norm is then taken as m * (sum (|x| / m)^p)^(1/p), m = max |x|
# (the rule and range of ``_formulas.robust_norm``).


def _needs_rescale(xp: Any, arrays: Sequence[Any], ord_code: int) -> bool:
    """float64 L2 and any other p can leave float64's range (float32 L1/L2 summed in
    float64 cannot; summed in float32, as JAX without x64 does, L2 can)."""
    return ord_code == 3 or (
        ord_code == 2
        and (wide_dtype(xp) != xp.float64 or any(_norm_dtype(xp, a) == xp.float64 for a in arrays))
    )


def _safe_range(xp: Any) -> tuple[float, float]:
    """Power sums inside this range are exact to the wide dtype's rounding: float64's
    (``SAFE_LO``, ``SAFE_HI``), or float32's (1e-30, 1e30: 3e38 overflows, and terms
    below the 1.2e-38 where float32 turns subnormal are < 1e-8 of such a sum)."""
    return (SAFE_LO, SAFE_HI) if wide_dtype(xp) == xp.float64 else (1e-30, 1e30)


def _robust_norms(xp: Any, x: Any, ord_code: int, p: float, axes: tuple[int, ...] | None) -> Any:
    """Norms over ``axes``, rescaled by max |x| where the plain power sum under/overflows.

    Branch-free (``where``, no host sync), so traced code (``jax.jit``) works.
    Dividing by the maximum, not multiplying by its inverse, stays finite for
    subnormal maxima, whose inverse overflows.
    """
    total = _pow_sum(xp, x, ord_code, p, axes)
    value = _root(xp, total, ord_code, p)
    if not _needs_rescale(xp, [x], ord_code) or math.prod(x.shape) == 0:
        return value
    a = xp.astype(xp.abs(x), wide_dtype(xp))
    m = xp.reshape(xp.max(a, axis=axes, keepdims=True), total.shape)
    ok = (m > 0.0) & (m < math.inf)
    safe = xp.where(ok, m, xp.ones_like(m))
    ratio = a / xp.reshape(safe, xp.max(a, axis=axes, keepdims=True).shape)
    scaled = _root(xp, xp.sum(ratio**p, axis=axes), 3, p) * safe
    lo, hi = _safe_range(xp)
    bad = ~((total > lo) & (total < hi))
    return xp.where(bad & ok, scaled, value)


@_quiet
def norm(
    xp: Any, x: Any, ord_code: int, p: float, axes: tuple[int, ...] | None, keepdims: bool
) -> Any:
    _check_float(xp, x, "norm")
    red = None if axes is None else axes
    value = _robust_norms(xp, x, ord_code, p, red)
    if keepdims:
        shape = tuple(1 if (red is None or i in red) else s for i, s in enumerate(x.shape))
        value = xp.reshape(value, shape)
    return xp.astype(value, _norm_dtype(xp, x))


@_quiet
def global_norm(
    xp: Any, arrays: Sequence[Any], ord_code: int, p: float, per_array: bool = False
) -> Any:
    total, per = _global_norms(xp, arrays, ord_code, p, per_array)
    return (total, per) if per_array else total


def _global_norms(
    xp: Any, arrays: Sequence[Any], ord_code: int, p: float, per_array: bool
) -> tuple[Any, Any]:
    """(0-d total norm, 1-D per-array norms or None), both in the norm dtype.

    The per-array norms come from the same power sums as the total (one
    reduction per array); where they leave float64's safe range they are
    rescaled by each array's own max |x|, as ``_robust_norms`` does.
    """
    for a in arrays:
        _check_float(xp, a, "norm")
    parts = [_pow_sum(xp, a, ord_code, p, None) for a in arrays]
    stacked = xp.stack(parts)
    total = _pow_sum(xp, stacked, 0, p, None) if ord_code == 0 else xp.sum(stacked)
    dtype = xp.float64 if any(_norm_dtype(xp, a) == xp.float64 for a in arrays) else xp.float32
    value = _root(xp, total, ord_code, p)
    per = _root(xp, stacked, ord_code, p) if per_array else None
    live = [a for a in arrays if math.prod(a.shape) > 0]
    if live and _needs_rescale(xp, arrays, ord_code):
        # As ``_robust_norms``, over all arrays: m = the largest max |x| of any.
        wide = [xp.astype(xp.abs(a), wide_dtype(xp)) for a in live]
        maxes = xp.stack([xp.max(a) for a in wide])
        m = xp.max(maxes)
        ok = (m > 0.0) & (m < math.inf)
        safe = xp.where(ok, m, xp.ones_like(m))
        s = xp.sum(xp.stack([xp.sum((a / safe) ** p) for a in wide]))
        lo, hi = _safe_range(xp)
        bad = ~((total > lo) & (total < hi))
        value = xp.where(bad & ok, _root(xp, s, 3, p) * safe, value)
        if per is not None:
            per = _rescaled_parts(xp, arrays, wide, maxes, stacked, per, p)
    return xp.astype(value, dtype), None if per is None else xp.astype(per, dtype)


def _rescaled_parts(
    xp: Any, arrays: Sequence[Any], wide: list[Any], maxes: Any, sums: Any, per: Any, p: float
) -> Any:
    """``per`` with each out-of-range power sum replaced by its max-rescaled norm
    (``wide``/``maxes``: the non-empty arrays' |x| and max |x|, in order)."""
    k = 0
    values = []
    for i, a in enumerate(arrays):
        if math.prod(a.shape) == 0:
            values.append(per[i])  # zero-size: norm 0 already
            continue
        m_i = maxes[k]
        ok = (m_i > 0.0) & (m_i < math.inf)
        safe = xp.where(ok, m_i, xp.ones_like(m_i))
        scaled = _root(xp, xp.sum((wide[k] / safe) ** p), 3, p) * safe
        lo, hi = _safe_range(xp)
        bad = ~((sums[i] > lo) & (sums[i] < hi))
        values.append(xp.where(bad & ok, scaled, per[i]))
        k += 1
    return xp.stack(values)


def nonfinite_positions(per: Any) -> list[int]:
    """Positions of the non-finite values of a 1-D norm array (reads them on the host)."""
    return [i for i in range(per.shape[0]) if not math.isfinite(float(per[i]))]


def check_writeable(x: Any, what: str) -> None:
    if not aac.is_writeable_array(x):
        raise TypeError(
            f"{what}_ cannot modify {type(x).__module__}.{type(x).__name__} arrays in place "
            f"(they are immutable or read-only); {out_of_place_hint(what)}"
        )


def check_all_writeable(arrays: list[Any], what: str) -> None:
    """Every target of a many-array in-place call can be written, checked before the
    first write: the flag alone is not enough (an array-api-strict array over a
    read-only or broadcast NumPy buffer reports itself writeable), so one element
    of each is written back with its own value, which changes no byte."""
    for a in arrays:
        check_writeable(a, what)
    for k, a in enumerate(arrays):
        if math.prod(a.shape) == 0:
            continue
        first = (0,) * len(a.shape)
        try:
            a[first] = a[first]
        except Exception as exc:  # the library's own refusal, whatever its type
            raise ValueError(
                f"{what}_ cannot write array {k} ({type(exc).__name__}: {exc}); nothing was "
                f"modified. {out_of_place_hint(what)}"
            ) from exc


def _scaled(xp: Any, x: Any, coef: Any, coef2: Any = None) -> Any:
    """x * coef (then * coef2) with the coefficients and the product in float64
    (where the namespace computes in it), the product rounded once to x's dtype.

    Rounding the coefficient to float32 first would flush factors below ~1e-45 to
    0 and turn ones above ~3e38 into inf although the products are representable;
    ``coef2`` is the second factor of a coefficient beyond the wide dtype's range
    (``_coefficients``).
    """
    wide = wide_dtype(xp)
    if coef2 is not None and not aac.is_lazy_array(coef2) and bool(xp.all(coef2 == 1)):
        # eager namespaces (array-api-strict): skip the second multiply, 8-11% of a
        # 2M-element float32 clip; lazy ones (JAX, Dask) keep it, as reading it
        # would force a computation (or fail under jax.jit)
        coef2 = None
    factors = [xp.astype(c, wide) for c in (coef, coef2) if c is not None]
    if xp.isdtype(x.dtype, "complex floating"):
        cwide = xp.complex128 if wide == xp.float64 else xp.complex64
        out = xp.astype(x, cwide)
        for c in factors:
            out = out * xp.astype(c, cwide)
        return xp.astype(out, x.dtype)
    out = xp.astype(x, wide)
    for c in factors:
        out = out * c
    return xp.astype(out, x.dtype)


def _coefficients(xp: Any, norms: Any, max_norm: Any, eps: float, mode: str) -> tuple[Any, Any]:
    """The coefficients as two factors (``coefficient_parts``), in the wide dtype;
    without a branch on their values (no host read of device or lazy arrays)."""
    split = 1000 if wide_dtype(xp) == xp.float64 else 100
    return coefficient_parts(norms, max_norm, eps, mode, xp=xp, log2_split=split)


@_quiet
def rescale(
    xp: Any,
    x: Any,
    ord_code: int,
    p: float,
    axes: tuple[int, ...] | None,
    max_norm: float,
    eps: float,
    mode: str,
    inplace: bool,
) -> tuple[Any, Any]:
    what = "clip_by_norm" if mode == "clip" else "normalize"
    _check_float(xp, x, what)
    if inplace:
        check_writeable(x, what)
    norms = _robust_norms(xp, x, ord_code, p, axes)
    coef, coef2 = _coefficients(xp, norms, max_norm, eps, mode)
    if axes is not None:
        shape = tuple(1 if i in axes else s for i, s in enumerate(x.shape))
        coef, coef2 = xp.reshape(coef, shape), xp.reshape(coef2, shape)
    out = _scaled(xp, x, coef, coef2)
    if inplace:
        x[...] = out
        out = x
    return out, xp.astype(norms, _norm_dtype(xp, x))


@_quiet
def clip_global(
    xp: Any,
    arrays: list[Any],
    max_norm: float,
    ord_code: int,
    p: float,
    eps: float,
    total_norm: float | None,
    error_if_nonfinite: bool,
    inplace: bool,
    per_array: bool = False,
) -> tuple[Any, ...]:
    if inplace:
        check_all_writeable(arrays, "clip_by_global_norm")
    norm_value, per = _global_norms(xp, arrays, ord_code, p, per_array or error_if_nonfinite)
    if total_norm is not None:
        norm_value = xp.asarray(total_norm, dtype=norm_value.dtype, device=aac.device(arrays[0]))
    if error_if_nonfinite and not math.isfinite(float(norm_value)):
        raise nonfinite_error(float(norm_value), nonfinite_positions(per))
    coef, coef2 = _coefficients(xp, xp.astype(norm_value, wide_dtype(xp)), max_norm, eps, "clip")
    outs = [_scaled(xp, a, coef, coef2) for a in arrays]
    if inplace:
        for a, o in zip(arrays, outs):
            a[...] = o
        outs = arrays
    return (outs, norm_value, per) if per_array else (outs, norm_value)


def clip_by_value(xp: Any, x: Any, lo: float | None, hi: float | None, inplace: bool) -> Any:
    if xp.isdtype(x.dtype, "complex floating"):
        raise TypeError("clip_by_value is not defined for complex arrays (they have no order)")
    if inplace:
        check_writeable(x, "clip_by_value")
    if x.dtype == xp.bool:
        # bool as 0/1, clamped to [ceil(min), floor(max)] within [0, 1] like other integers
        as_int = xp.astype(x, xp.int8)
        lo_i, hi_i = int_bound(lo, 0, 1, True), int_bound(hi, 0, 1, False)
        clipped = clip_by_value(xp, as_int, lo_i, hi_i, False) != 0
        if inplace:
            x[...] = clipped
            return x
        return clipped
    out = x
    if xp.isdtype(x.dtype, "integral"):
        info = xp.iinfo(x.dtype)
        lo = int_bound(lo, int(info.min), int(info.max), True)
        hi = int_bound(hi, int(info.min), int(info.max), False)
    if lo is not None:
        out = xp.where(out < lo, xp.asarray(lo, dtype=x.dtype, device=aac.device(x)), out)
    if hi is not None:
        out = xp.where(out > hi, xp.asarray(hi, dtype=x.dtype, device=aac.device(x)), out)
    if inplace:
        x[...] = out
        return x
    return out


@_quiet
def scale_(xp: Any, arrays: list[Any], factor: float) -> None:
    check_all_writeable(arrays, "scale")
    outs = [_scaled(xp, a, xp.asarray(factor, device=aac.device(a))) for a in arrays]
    for a, o in zip(arrays, outs):
        a[...] = o


def check_value_targets(xp: Any, arrays: list[Any]) -> None:
    """What clip_by_value_ checks for each array, for all of them before any is written."""
    for a in arrays:
        check_writeable(a, "clip_by_value")


def clamp_many_(xp: Any, arrays: list[Any], lo: float | None, hi: float | None) -> None:
    """clip_by_value_ on every array, all validated before the first is written."""
    check_value_targets(xp, arrays)
    for a in arrays:
        clip_by_value(xp, a, lo, hi, True)


def check_targets(xp: Any, arrays: list[Any], what: str) -> None:
    """Validate in-place targets of a global clip (nothing written)."""
    for a in arrays:
        check_writeable(a, what)
