"""The GPU route's ops: CuPy kernels on CuPy arrays and torch CUDA tensors, without host syncs.

Flow of a global-norm clip (one dtype): upload (or reuse) the tensor table,
``fastclip_partial_pow_sum`` writes one float64 partial per chunk,
``fastclip_finish`` reduces them and writes the norm and the clip coefficient
to device memory, ``fastclip_scale`` reads the coefficient there.  The
coefficient is a pair (c, c2) with the CPU route's two-factor rule
(``_formulas.coefficient_parts``: c2 a power of two, 1 except where
``max_norm / (norm + eps)`` lies beyond 2**+-1000), applied as ``(x * c) * c2``.  Three
launches per call (plus one partial and one scale per extra dtype), whatever
the number of tensors, and the host never waits for the device: results are
0-d device arrays.  Only ``error_if_nonfinite=True`` reads the norm back (one
synchronisation, documented).

Kernels run on torch's current stream for CUDA tensors and on CuPy's current
stream for CuPy arrays.  Scratch memory comes from the same library's
stream-ordered allocator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import nonfinite_error
from .._formulas import int_bound
from .._memory import check_self_overlap
from . import _adapters
from ._adapters import check_kind
from ._axes import rescale_axes
from ._tables import Packed

__all__ = [
    "clamp_many_",
    "clip_by_value",
    "clip_global",
    "global_norm",
    "norm",
    "rescale",
    "scale_",
]


def _raise_if_nonfinite(lib: Any, src: Packed, norm: Any, ord_code: int, p: float) -> None:
    value = lib.host_float(norm)  # the one documented synchronisation
    if not math.isfinite(value):
        # Raising: the arrays' norms from the same partials (one small launch per
        # dtype), read back to name the culprits.
        per = src.per_array_norms(ord_code, p)
        bad = [i for i in range(per.shape[0]) if not math.isfinite(lib.host_float(per[i]))]
        raise nonfinite_error(value, bad)


def global_norm(
    lib: Any, arrays: Sequence[Any], ord_code: int, p: float, per_array: bool = False
) -> Any:
    with _adapters.on_device(lib, arrays[0]):
        packed = Packed(lib, arrays, "norm", writing=False)
        if per_array:
            norm, _, per = packed.finish(ord_code, p, 0.0, 0.0, 0, None, True)
            return norm, per
        return packed.finish(ord_code, p, 0.0, 0.0, 0)[0]


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
    with _adapters.on_device(lib, arrays[0]):
        src = Packed(lib, arrays, "clip_by_global_norm", writing=inplace)
        given = None
        if total_norm is not None:
            given = (
                lib.to_f64(total_norm)
                if hasattr(total_norm, "shape")
                else lib.full_f64(float(total_norm), arrays[0])
            )
        per = None
        if per_array:
            norm, coef, per = src.finish(ord_code, p, max_norm, eps, 3, given, True)
        else:
            norm, coef = src.finish(ord_code, p, max_norm, eps, 3, given)
        if error_if_nonfinite:
            _raise_if_nonfinite(lib, src, norm, ord_code, p)
        if inplace:
            src.launch_scale(None, coef)
            lib.touched(arrays)
            outs = arrays
        else:
            outs = [lib.empty_like(a) for a in arrays]
            dst = Packed(lib, outs, "clip_by_global_norm", writing=False)
            src.launch_scale(dst, coef)
        return (outs, norm, per) if per_array else (outs, norm)


def scale_(lib: Any, arrays: list[Any], factor: Any) -> None:
    with _adapters.on_device(lib, arrays[0]):
        packed = Packed(lib, arrays, "scale_", writing=True)
        one = (
            lib.to_f64(factor)
            if hasattr(factor, "shape")
            else lib.full_f64(float(factor), arrays[0])
        )
        # fastclip_scale reads the pair (c, c2): here (factor, 1), two device copies
        coef = lib.empty((2,), "float64", arrays[0])
        lib.write_back(coef, lib.full_f64(1.0, arrays[0]))
        lib.write_back(coef[0:1], lib.reshape(one, (1,)))
        packed.launch_scale(None, coef)
        lib.touched(arrays)


def clamp_many_(lib: Any, arrays: list[Any], lo: float | None, hi: float | None) -> None:
    with _adapters.on_device(lib, arrays[0]):
        packed = Packed(lib, arrays, "clip_by_value", writing=True)
        packed.launch_clamp(-math.inf if lo is None else lo, math.inf if hi is None else hi)
        lib.touched(arrays)


def _integer_bounds(x: Any, lo: float | None, hi: float | None) -> tuple[Any, Any]:
    """Float bounds saturated to the integer (or bool: 0/1) range of ``x``'s dtype,
    so inf and 1e30 neither overflow nor wrap (see ``int_bound``)."""
    name = str(x.dtype).replace("torch.", "")
    if name == "bool":
        lo_end, hi_end = 0, 1
    else:
        info = np.iinfo(np.dtype(name))
        lo_end, hi_end = int(info.min), int(info.max)
    return int_bound(lo, lo_end, hi_end, True), int_bound(hi, lo_end, hi_end, False)


def clip_by_value(lib: Any, x: Any, lo: float | None, hi: float | None, inplace: bool) -> Any:
    if not lib.is_float(x):
        out = x if inplace else lib.empty_like(x)
        lo_i, hi_i = _integer_bounds(x, lo, hi)
        with _adapters.on_device(lib, x):
            lib.clip_integers(x, out, lo_i, hi_i)  # the library's own clip for integers
        return out
    if lib.kind(x) is None:
        raise TypeError(f"clip_by_value on the GPU does not support {x.dtype}")
    with _adapters.on_device(lib, x):
        out = x if inplace else lib.empty_like(x)
        if not inplace:
            lib.write_back(out, x)  # device-to-device copy, then clamp in place
        packed = Packed(lib, [out], "clip_by_value", writing=True)
        packed.launch_clamp(-math.inf if lo is None else lo, math.inf if hi is None else hi)
    if inplace:
        lib.touched([x])
    return out


def norm(
    lib: Any, x: Any, ord_code: int, p: float, axes: tuple[int, ...] | None, keepdims: bool
) -> Any:
    check_kind(lib, x, "norm")
    shape = tuple(x.shape)
    if axes is None or len(axes) == len(shape):
        value = global_norm(lib, [x], ord_code, p)
        return lib.reshape(value, (1,) * len(shape)) if keepdims else value
    _, norms = rescale_axes(lib, x, ord_code, p, axes, 0.0, 0.0, 0, None)
    kept = tuple(s for i, s in enumerate(shape) if i not in axes)
    if keepdims:
        kept = tuple(1 if i in axes else s for i, s in enumerate(shape))
    return lib.reshape(norms, kept)


def rescale(
    lib: Any,
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
    check_kind(lib, x, what)
    if inplace and not lib.contiguous(x):
        check_self_overlap(tuple(x.shape), lib.strides(x), what)
    mode_code = 3 if mode == "clip" else 4  # the two factors (c, c2) of coefficient_parts
    shape = tuple(x.shape)
    out = x if inplace else lib.empty_like(x)
    if axes is None or len(axes) == len(shape):
        with _adapters.on_device(lib, x):
            src = Packed(lib, [x], what, writing=False)
            norm_value, coef = src.finish(ord_code, p, max_norm, eps, mode_code)
            dst = None if inplace else Packed(lib, [out], what, writing=False)
            src.launch_scale(dst, coef)
    else:
        _, norms = rescale_axes(lib, x, ord_code, p, axes, max_norm, eps, mode_code, out)
        kept = tuple(s for i, s in enumerate(shape) if i not in axes)
        norm_value = lib.reshape(norms, kept)
    if inplace:
        lib.touched([x])
    return out, norm_value
