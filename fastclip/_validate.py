"""Argument checks shared by every route.  All raise before anything is written."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import numpy as np
from numpy.exceptions import AxisError

from ._errors import NonFiniteNormError, out_of_place_hint
from ._memory import check_self_overlap

__all__ = [
    "AxisError",
    "NonFiniteNormError",
    "check_axis",
    "check_bounds",
    "check_eps",
    "check_max_norm",
    "check_nonfinite",
    "check_ord",
    "check_self_overlap",
    "clip_mode",
    "norm_args",
    "out_of_place_hint",
    "reduction_axes",
    "scalar_value",
    "too_large_message",
]


def scalar_value(value: Any, name: str, hint: str = "") -> float:
    """A Python float from a real number or a 0-d (or size-1) real array.

    A Python int beyond float64's range (``10**400``) is a ValueError, as
    NumPy and torch refuse it too (with an OverflowError): rounding it to
    ``inf`` would change the meaning of a bound or a factor silently.

    Reading a 0-d device array this way synchronises; the GPU backend avoids it.
    """
    if type(value) is float:  # the common case, fast
        return value
    if type(value) is int:
        return _float_of(value, name, hint)
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        return _float_of(value, name, hint)
    shape = getattr(value, "shape", None)
    if shape is not None and math.prod(shape) == 1:
        dtype = str(getattr(value, "dtype", ""))
        if "complex" in dtype or "bool" in dtype:
            raise TypeError(f"{name} must be a real number, got an array of dtype {dtype}")
        return _float_of(value.reshape(()) if shape != () else value, name, hint)
    raise TypeError(f"{name} must be a real number or a 0-d array, got {type(value).__name__}")


def _float_of(value: Any, name: str, hint: str = "") -> float:
    """``float(value)``; a value too large for a float64 raises ValueError naming ``name``."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(too_large_message(name, hint)) from None


def too_large_message(name: str, hint: str = "") -> str:
    """The message for a number beyond float64's range (a Python int such as ``10**400``)."""
    return (
        f"{name} is too large for a float64 (its magnitude exceeds 1.8e308); pass a value "
        f"in float64's range{'; ' + hint if hint else ''}"
    )


def check_ord(ord: Any, name: str = "ord") -> tuple[int, float]:
    """Validate ``ord`` -> (ord_code, p): ord_code 0 = inf, 1 = L1, 2 = L2, 3 = other p > 0.

    ``name`` is the argument's name in the message (``norm_type`` in fastclip.torch).
    """
    known = _KNOWN_ORDS.get(ord) if type(ord) is int or type(ord) is float else None
    if known is not None:
        return known
    if isinstance(ord, str) and ord.strip().lower() in ("inf", "+inf", "infinity"):
        ord = math.inf
    if isinstance(ord, bool) or not isinstance(ord, numbers.Real):
        raise ValueError(f"{name} must be a real number p > 0 or inf{_ORD_FIX}, got {ord!r}")
    p = _float_of(ord, name, f"{name}=math.inf is the max-norm")
    if math.isnan(p) or p <= 0:
        raise ValueError(f"{name} must be a real number p > 0 or inf{_ORD_FIX}, got {ord!r}")
    if math.isinf(p):
        return 0, p
    if p == 1.0:
        return 1, p
    if p == 2.0:
        return 2, p
    return 3, p


_ORD_FIX = " (math.inf or 'inf' is the max-norm)"
_KNOWN_ORDS = {2: (2, 2.0), 1: (1, 1.0), math.inf: (0, math.inf)}


def check_max_norm(max_norm: Any, name: str = "max_norm") -> float:
    """A non-negative, non-NaN float (inf allowed: no clipping)."""
    value = scalar_value(max_norm, name, f"{name}=math.inf means no clipping")
    if not value >= 0.0:  # also catches NaN
        raise ValueError(
            f"{name} must be >= 0 and not NaN, got {max_norm!r} ({name}=math.inf means no clipping)"
        )
    return value


def check_eps(eps: Any) -> float:
    value = scalar_value(eps, "eps")
    if not 0.0 <= value < math.inf:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return value


def check_axis(axis: Any, ndim: int) -> tuple[int, ...]:
    """Normalise ``axis`` (int or tuple of ints, the *reduction* axes) to sorted positives."""
    if axis is None:
        return tuple(range(ndim))
    items = (axis,) if isinstance(axis, numbers.Integral) else axis
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}") from None
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
        if not -ndim <= int(a) < ndim:
            raise AxisError(int(a), ndim)
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis must not repeat an axis, got {axis!r}")
    return tuple(sorted(out))


def reduction_axes(x: Any, axis: Any) -> tuple[int, ...] | None:
    """``axis`` of ``x`` checked as reduction axes (sorted, non-negative), or None."""
    if axis is None:
        return None
    return check_axis(axis, len(x.shape))


def check_bounds(min: Any, max: Any) -> tuple[float | None, float | None]:
    """Validate clip_by_value bounds: real, not NaN, min <= max, at least one given."""
    if min is None and max is None:
        raise ValueError("min and max are both None: pass at least one bound")
    lo = None if min is None else scalar_value(min, "min", "min=None means no lower bound")
    hi = None if max is None else scalar_value(max, "max", "max=None means no upper bound")
    if (lo is not None and math.isnan(lo)) or (hi is not None and math.isnan(hi)):
        raise ValueError("min and max must not be NaN")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"min must be <= max, got min={min!r} > max={max!r}")
    return lo, hi


NONFINITE_POLICIES = ("propagate", "error", "skip")


def check_nonfinite(policy: Any) -> str:
    """The fused steps' and clippers' ``nonfinite`` policy, checked."""
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return str(policy)


def clip_mode(max_norm: Any, total_norm: Any, clip_coef: Any, what: str) -> str:
    """The clip arguments' rules, shared by the CPU and GPU routes: ``"coef"``
    (a given coefficient, exclusive of ``max_norm``/``total_norm``), ``"none"``
    (no clipping) or ``"norm"`` (clip to ``max_norm``)."""
    if clip_coef is not None:
        if max_norm is not None or total_norm is not None:
            raise ValueError(f"{what}: pass either clip_coef or max_norm (and total_norm)")
        return "coef"
    if max_norm is None:
        if total_norm is not None:
            raise ValueError(f"{what}: total_norm needs max_norm")
        return "none"
    return "norm"


def norm_args(max_norm: Any, norm_type: Any, eps: Any) -> tuple[float, int, float, float]:
    """Validated ``(max_norm, ord_code, p, eps)`` for ``"norm"`` clipping."""
    return (check_max_norm(max_norm), *check_ord(norm_type), check_eps(eps))


_DTYPE = operator.attrgetter("dtype")
#: Dtypes ``check_orderable`` has passed (any library's; a handful per process):
#: the next call skips building their names (1-2 us a call).
_ORDERABLE: set[Any] = set()


def check_orderable(items: list[Any]) -> None:
    """TypeError for complex (no order) or non-numeric arrays anywhere in the list."""
    for dtype in set(map(_DTYPE, items)):
        key = (type(dtype), dtype)  # array_api_strict's dtypes refuse == with NumPy's
        if key in _ORDERABLE:  # checked before
            continue
        name = str(dtype)
        i = next(i for i, a in enumerate(items) if a.dtype == dtype)
        if "complex" in name:
            raise TypeError(
                f"clip_by_value is not defined for complex arrays (they have no order); "
                f"item {i} of the list is {name}. Clip the real and imaginary parts "
                "separately, or use fastclip.clip_by_norm to bound the magnitude"
            )
        # ml_dtypes' floats (JAX's bfloat16) are NumPy kind "V": floats all the same
        ml_float = isinstance(dtype, np.dtype) and dtype.kind == "V" and "float" in name
        if isinstance(dtype, np.dtype) and dtype.kind not in "biuf" and not ml_float:
            raise TypeError(
                "clip_by_value needs numeric arrays (bool, integer or floating); "
                f"item {i} of the list is {name}"
            )
        _ORDERABLE.add(key)
