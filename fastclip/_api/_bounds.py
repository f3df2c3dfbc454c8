"""Array-valued bounds: ``clip_by_value`` with ``min``/``max`` arrays and
``clip_by_norm`` with a ``max_norm`` array (TensorFlow's tensor-valued bounds).

The route (``fastclip.info()``'s routes take scalar bounds): the norms come
from :func:`fastclip.norm` (the array's own fast route), and the clamp or the
scaling is one call of the array's own library on its device: ``numpy.clip``
/ ``torch.clamp`` / the Array API ``clip`` for bounds, one multiply by the
per-slice factors for ``max_norm`` (in place: ``out=``, ``mul_``).  Nothing moves between
libraries or devices: a bound of another library or device is a TypeError.
Every bound is checked (shape, dtype, NaN, ``min <= max``, ``max_norm >= 0``)
before anything is written; checking values reads them once (one host
synchronisation for device arrays).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import array_api_compat as aac
import numpy as np

from .. import _dispatch
from .._formulas import clip_coefficients
from .._libraries import check_autograd_writable, library_of, wide_dtype
from .._memory import check_self_overlap
from .._validate import check_eps, check_ord, reduction_axes, scalar_value
from ._norms import norm

__all__ = ["clip_by_norm_arrays", "clip_by_value_arrays", "is_array_bound"]


def is_array_bound(value: Any) -> bool:
    """A bound that is an array of more (or fewer) than one element; size-1
    arrays keep the scalar meaning they always had, and lists stay refused
    (convert them with the array library's ``asarray``, on x's device)."""
    shape = getattr(value, "shape", None)
    if aac.is_dask_array(value):  # any size: read in the Dask route's graph, not here
        return True
    return shape is not None and math.prod(tuple(shape)) != 1


def _fail(kind: type[Exception], fn: str, text: str) -> Exception:
    return kind(f"fastclip.{fn}: {text}")


def _bound(value: Any, name: str, x: Any, xp: Any, target: tuple[int, ...], fn: str) -> Any:
    """``value`` as an array of ``x``'s library and device (a Python number stays
    one), checked: real, not NaN, broadcasting to ``target`` without growing it."""
    if value is None:
        return None
    if not hasattr(value, "shape"):
        try:
            v = scalar_value(value, name)
        except (TypeError, ValueError) as e:
            raise type(e)(f"fastclip.{fn}: {e}") from None
        if math.isnan(v):
            raise _fail(ValueError, fn, f"{name} must not be NaN")
        return v
    if library_of(value) != library_of(x) or aac.device(value) != aac.device(x):
        raise _fail(
            TypeError,
            fn,
            f"{name} is a {type(value).__module__} array on {aac.device(value)} but x is a "
            f"{type(x).__module__} array on {aac.device(x)}; fastclip never moves data "
            "between libraries or devices silently (convert the bound first)",
        )
    if xp.isdtype(value.dtype, "bool") or not xp.isdtype(
        value.dtype, ("integral", "real floating")
    ):
        raise _fail(TypeError, fn, f"{name} must be real, got dtype {value.dtype}")
    shape = tuple(value.shape)
    if any(s is None or math.isnan(s) for s in shape):  # dask after boolean indexing
        raise _fail(
            ValueError,
            fn,
            f"{name} has unknown length (shape {shape}, e.g. a dask array after boolean "
            f"indexing), so its broadcast to shape {target} cannot be checked without "
            f"computing it; call {name}.compute_chunk_sizes() first (or persist it)",
        )
    try:
        grown = np.broadcast_shapes(shape, target)
    except ValueError:
        grown = None
    if grown != target:
        raise _fail(
            ValueError,
            fn,
            f"{name} of shape {shape} does not broadcast to shape {target} (it may have "
            "size-1 or missing leading axes, and must not grow the result)",
        )
    if xp.isdtype(value.dtype, "integral"):  # compared and rounded as floats below
        value = xp.astype(value, wide_dtype(xp))
    return value


def _check_values(xp: Any, lo: Any, hi: Any, fn: str, hi_name: str = "max") -> None:
    """No NaN, and ``lo <= hi`` elementwise: with both bounds one pass (a NaN
    fails ``<=`` too), the reason found only on the error path."""
    arrays = [(b, name) for b, name in ((lo, "min"), (hi, hi_name)) if hasattr(b, "shape")]
    if lo is not None and hi is not None:
        if bool(xp.all(lo <= hi)):
            return
        for b, name in arrays:
            if bool(xp.any(xp.isnan(b))):
                raise _fail(ValueError, fn, f"{name} must not contain NaN")
        raise _fail(ValueError, fn, "min must be <= max elementwise")
    for b, name in arrays:
        if bool(xp.any(xp.isnan(b))):
            raise _fail(ValueError, fn, f"{name} must not contain NaN")


def _check_target(x: Any, fn: str) -> None:
    """What an in-place write needs, before it: a writable, non-aliased array."""
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:
            raise _fail(ValueError, fn, "x is read-only; use the out-of-place function")
        check_self_overlap(x.shape, x.strides, fn.rstrip("_"))
    elif aac.is_torch_array(x):
        check_autograd_writable([x], fn)
        check_self_overlap(tuple(x.shape), x.stride(), fn.rstrip("_"))
    elif aac.is_jax_array(x) or aac.is_dask_array(x):
        raise _fail(
            TypeError, fn, f"{type(x).__module__} arrays are immutable; use {fn.rstrip('_')}"
        )


def _write(x: Any, out: Any) -> None:
    if isinstance(x, np.ndarray):
        np.copyto(x, out)
    elif aac.is_torch_array(x):
        torch = sys.modules["torch"]
        with torch.no_grad():
            x.copy_(out)
    else:
        x[...] = out


def clip_by_value_arrays(x: Any, lo: Any, hi: Any, *, inplace: bool) -> Any:
    """``clip_by_value(_)`` with array-valued bounds (see the module docstring)."""
    fn = "clip_by_value_" if inplace else "clip_by_value"
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise _fail(
            TypeError,
            fn,
            "array-valued min/max take one array x (a list would need one bound per "
            "array: call it per array)",
        )
    xp = aac.array_namespace(x)
    if not xp.isdtype(x.dtype, "real floating"):
        raise _fail(
            TypeError,
            fn,
            f"array-valued min/max take real floating-point x, got dtype {x.dtype}; pass "
            "scalar bounds for integer and bool arrays",
        )
    target = tuple(x.shape)
    lo = _bound(lo, "min", x, xp, target, fn)
    hi = _bound(hi, "max", x, xp, target, fn)
    if lo is None and hi is None:
        raise _fail(ValueError, fn, "needs at least one of min or max")
    if aac.is_dask_array(x):  # lazy: the Dask route checks the values in its graph
        return _dispatch.backend_of(x).clip_by_value(x, lo, hi, inplace=inplace)
    _check_values(xp, lo, hi, fn)
    if inplace:
        _check_target(x, fn)
    # Bounds rounded to x's dtype first: rounding is monotonic and x's values are
    # representable, so this equals clamping in float64 and rounding the result.
    dev = aac.device(x)
    lo, hi = (
        None if b is None else xp.astype(xp.asarray(b, device=dev), x.dtype, copy=False)
        for b in (lo, hi)
    )
    # One fused pass in the library's own clamp (NaN elements stay NaN in each)
    if isinstance(x, np.ndarray):
        return np.clip(x, lo, hi, out=x if inplace else None)
    if aac.is_torch_array(x):
        if not inplace:
            return sys.modules["torch"].clamp(x, lo, hi)
        with sys.modules["torch"].no_grad():
            x.clamp_(lo, hi)
        return x
    out = xp.clip(x, lo, hi)
    if inplace:
        x[...] = out
        return x
    return out


def clip_by_norm_arrays(
    x: Any, max_norm: Any, ord: Any, axis: Any, eps: Any, *, inplace: bool
) -> Any:
    """``clip_by_norm(_)`` with an array ``max_norm`` broadcasting to the norms
    (``keepdims`` shape); returns the clipped array, or the norms for ``_``."""
    fn = "clip_by_norm_" if inplace else "clip_by_norm"
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise _fail(TypeError, fn, f"x must be an array, got {type(x).__name__}")
    try:
        check_ord(ord)
        check_eps(eps)
        axes = reduction_axes(x, axis)
    except (TypeError, ValueError) as e:
        raise type(e)(f"fastclip.{fn}: {e}") from None
    xp = aac.array_namespace(x)
    nd = len(x.shape)
    kept = tuple(range(nd)) if axes is None else axes
    target = tuple(1 if i in kept else s for i, s in enumerate(x.shape))
    c = _bound(max_norm, "max_norm", x, xp, target, fn)
    if aac.is_dask_array(x):  # lazy: the Dask route checks the values in its graph
        ord_code, p = check_ord(ord)
        out, kept_norms = _dispatch.backend_of(x).rescale(
            x, ord_code, p, axes=axes, max_norm=c, eps=check_eps(eps), mode="clip", inplace=inplace
        )
        return kept_norms if inplace else out
    _check_values(xp, None, c, fn, "max_norm")
    if hasattr(c, "shape") and bool(xp.any(c < 0)):
        raise _fail(ValueError, fn, "max_norm must be >= 0 everywhere")
    if inplace:
        _check_target(x, fn)
    norms = norm(x, ord, axis=axes, keepdims=True)  # the array's own (fast) route
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cn = xp.astype(c, norms.dtype) if hasattr(c, "shape") else c
        f = clip_coefficients(norms, cn, float(eps), xp=xp)
        kept_norms = xp.reshape(norms, tuple(s for i, s in enumerate(x.shape) if i not in kept))
        if xp.isdtype(x.dtype, "complex floating") or x.dtype == f.dtype:
            if not inplace:
                return x * f
            _scale_in_place(x, f)
            return kept_norms
        # 16-bit x: the product in the norms' float32, rounded once to x's dtype
        out = xp.astype(xp.astype(x, f.dtype) * f, x.dtype)
    if not inplace:
        return out
    _write(x, out)
    return kept_norms


def _scale_in_place(x: Any, f: Any) -> None:
    if isinstance(x, np.ndarray):
        np.multiply(x, f, out=x)
    elif aac.is_torch_array(x):
        with sys.modules["torch"].no_grad():
            x.mul_(f)
    else:
        x[...] = x * f
