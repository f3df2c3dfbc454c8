"""The CPU route's operations: norms, clipping by norm and by value, scaling.

Each takes the adapter (``NumpyLib`` or ``TorchLib``) first, validates memory
before any write, and wraps results in the caller's array type:

* one array, whole: the ``arr_*`` kernels on its flat storage (a contiguous
  copy in and out where the data is strided);
* one array, per slice: ``AxisPlan``;
* lists: ``pack`` into tables, then the ``tab_*`` kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _config as cfg
from .._errors import nonfinite_error, out_of_place_hint
from .._formulas import coefficient_parts, int_bound, needs_rescale, robust_norm, root
from .._memory import check_self_overlap
from . import _per_array
from ._adapters import float_storage, ml_dtypes_hint, norm_dtype
from ._axes import AxisPlan
from ._launch import run
from ._pack import Packed, pack


def _flat_norm(sv: np.ndarray, ord_code: int, p: float) -> float:
    flat = sv.reshape(-1)  # a copy when sv is not contiguous: read-only use
    wide = norm_dtype(sv.dtype) == np.float64

    def pow_sum(pc: int, pp: float, inv: float) -> float:
        return float(run("arr_pow_sum", flat.size, flat, pc, pp, inv, cfg.CHUNK))

    return robust_norm(pow_sum, ord_code, p, wide)


def norm(
    lib: Any, x: Any, ord_code: int, p: float, axes: tuple[int, ...] | None, keepdims: bool
) -> Any:
    sv = float_storage(lib, x, "norm")
    dtype = norm_dtype(sv.dtype)
    if axes is None or len(axes) == sv.ndim:
        value = _flat_norm(sv, ord_code, p)
        shape = (1,) * sv.ndim if keepdims else ()
        return lib.wrap(np.full(shape, value), dtype, x)
    plan = AxisPlan(sv, axes)
    values = plan.norms(ord_code, p, dtype == np.float64).reshape(plan.kept_shape)
    if keepdims:
        values = values.reshape(tuple(1 if i in axes else s for i, s in enumerate(sv.shape)))
    return lib.wrap(values, dtype, x)


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
    """clip_by_norm / normalize, whole array or per slice: returns (output, norms before)."""
    what = "clip_by_norm" if mode == "clip" else "normalize"
    sv = float_storage(lib, x, what)
    if inplace and not lib.writeable(x):
        raise ValueError(f"{what}_ got a read-only array; {out_of_place_hint(what)}")
    if inplace and not sv.flags.c_contiguous:
        check_self_overlap(sv.shape, sv.strides, what)
    dtype = norm_dtype(sv.dtype)
    out = x if inplace else lib.empty_like(x)
    out_sv = sv if inplace else lib.storage(out)
    if axes is None or len(axes) == sv.ndim:
        value = _clip_whole(sv, out_sv, ord_code, p, max_norm, eps, mode)
        norms: Any = lib.wrap(value, dtype, x)
    else:
        plan = AxisPlan(sv, axes)
        target = None if inplace else out_sv
        values = None
        # One fused launch for contiguous rows: float32/16-bit data with one-factor
        # coefficients (rows_clip), float64 with two-factor ones and the L2
        # rescaling of AxisPlan.norms (rows_clip_wide).  complex128, ord_code 3
        # (rescaled power sums of any p) and per-row bounds take the two launches.
        if mode == "clip" and ord_code <= 2 and np.ndim(max_norm) == 0:
            if sv.dtype not in _WIDE_STORAGE or sv.dtype == np.float64:
                wide = sv.dtype == np.float64
                values = plan.fused_clip(ord_code, p, float(max_norm), eps, target, wide)
        if values is None:
            values = plan.norms(ord_code, p, dtype == np.float64)
            coefs, coefs2 = coefficient_parts(values, max_norm, eps, mode)
            plan.scale(coefs, target, coefs2 if (coefs2 != 1.0).any() else None)
        norms = lib.wrap(values.reshape(plan.kept_shape), dtype, x)
    if inplace:
        lib.touched([x])
    return out, norms


def _clip_whole(
    sv: np.ndarray,
    out_sv: np.ndarray,
    ord_code: int,
    p: float,
    max_norm: float,
    eps: float,
    mode: str,
) -> float:
    """Norm of all of ``sv`` and the scaled result into ``out_sv`` (which may be ``sv``)."""
    inplace = out_sv is sv
    contiguous = sv.flags.c_contiguous
    src = sv.reshape(-1) if contiguous else np.ascontiguousarray(sv).reshape(-1)
    dst = src if inplace else out_sv.reshape(-1)  # out_sv is freshly allocated, contiguous
    # One fused launch: arr_clip (one-factor coefficient) for 32/16-bit data,
    # arr_clip_wide for float64 (two factors, the L2 rescaling of robust_norm);
    # complex128 and ord_code 3 take the two calls below.
    value: float | None = None
    if mode == "clip" and ord_code <= 2 and sv.dtype not in _WIDE_STORAGE:
        value = float(
            run("arr_clip", src.size, src, dst, ord_code, p, max_norm, eps, dst is src, cfg.CHUNK)
        )
    elif mode == "clip" and ord_code <= 2 and sv.dtype == np.float64:
        value = _whole_wide(src, dst, ord_code, p, max_norm, eps)
    if value is None:
        value = _flat_norm(src, ord_code, p)
        _scale_whole(src, dst, *_coefficients(value, max_norm, eps, mode))
    if inplace and not contiguous:
        sv[...] = src.reshape(sv.shape)  # copy out
    return value


def _scale_whole(src: np.ndarray, dst: np.ndarray, coef: float, coef2: float) -> None:
    """dst = (src * coef) * coef2, the second factor a pass of its own where it is not 1."""
    run("arr_scale", src.size, src, dst, coef, dst is src, cfg.CHUNK)
    if coef2 != 1.0:
        run("arr_scale", dst.size, dst, dst, coef2, True, cfg.CHUNK)


def _whole_wide(
    src: np.ndarray, dst: np.ndarray, ord_code: int, p: float, max_norm: float, eps: float
) -> float:
    """The fused float64 clip of a flat array (``arr_clip_wide``): its norm, bit for bit
    ``_flat_norm`` and the scaling by ``coefficient_parts`` (which it replaces)."""
    args = (src, dst, ord_code, p, max_norm, eps, dst is src, cfg.CHUNK)
    value, total, inv = run("arr_clip_wide", src.size, *args)
    if inv != 0.0:  # left unscaled: finish as robust_norm and the two calls do
        value = _rescaled_root(total, inv, p)
        _scale_whole(src, dst, *_coefficients(value, max_norm, eps, "clip"))
    return float(value)


def _table_wide(packed: Packed, ord_code: int, p: float, max_norm: float, eps: float) -> float:
    """The fused in-place float64 clip of one table (``tab_clip_wide``): its norm, bit
    for bit ``Packed.norm`` and ``Packed.scale`` by ``coefficient_parts``."""
    t = packed.tables[0]
    args = (t.addrs, t.sizes, t.like, ord_code, p, max_norm, eps, cfg.CHUNK)
    value, total, inv = run("tab_clip_wide", t.n, *args)
    if inv != 0.0:  # left unscaled: finish as Packed.norm and the two launches do
        value = _rescaled_root(total, inv, p)
        coef, coef2 = _coefficients(value, max_norm, eps, "clip")
        packed.scale(coef)
        if coef2 != 1.0:
            packed.scale(coef2)
    return float(value)


def _rescaled_root(total: float, inv: float, p: float) -> float:
    """``robust_norm``'s rescaled norm from the power sum of the data times ``inv``
    (the sum and ``inv`` a ``*_clip_wide`` kernel returned), in the same NumPy
    arithmetic."""
    return float(root(float(total), 3, p)) / float(inv)


def _coefficients(value: float, max_norm: float, eps: float, mode: str) -> tuple[float, float]:
    """The coefficient of one norm as two float factors (the second is 1.0 but where
    the quotient leaves float64's normal range: ``coefficient_parts``)."""
    c, c2 = coefficient_parts(np.float64(value), max_norm, eps, mode)
    return float(c), float(c2)


# Storage dtypes whose norms are float64 (and may need max-rescaling for L2).
_WIDE_STORAGE = frozenset((np.dtype(np.float64), np.dtype(np.complex128)))


def clip_by_value(lib: Any, x: Any, lo: float | None, hi: float | None, inplace: bool) -> Any:
    if inplace and not lib.writeable(x):
        raise ValueError(
            f"clip_by_value_ got a read-only array; {out_of_place_hint('clip_by_value')}"
        )
    sv = lib.storage(x)
    if sv.dtype.kind == "c":
        raise TypeError("clip_by_value is not defined for complex arrays (they have no order)")
    if sv.dtype.kind not in "biuf":
        raise TypeError(
            f"clip_by_value needs numeric arrays (bool, integer or floating), got {sv.dtype}"
            f"{ml_dtypes_hint(lib, x)}"
        )
    if inplace and not sv.flags.c_contiguous:
        check_self_overlap(sv.shape, sv.strides, "clip_by_value")
    out = x if inplace else lib.empty_like(x)
    out_sv = sv if inplace else lib.storage(out)
    if not lib.is_float(x):
        # Integer and bool data: NumPy's own clip, which is exact for them.
        _clip_integers(sv, out_sv, lo, hi)
    else:
        vmin = -math.inf if lo is None else lo
        vmax = math.inf if hi is None else hi
        contiguous = sv.flags.c_contiguous
        src = sv.reshape(-1) if contiguous else np.ascontiguousarray(sv).reshape(-1)
        dst = out_sv.reshape(-1) if not inplace else src  # fresh outputs are contiguous
        run("arr_clamp", src.size, src, dst, vmin, vmax, dst is src, cfg.CHUNK)
        if inplace and not contiguous:
            sv[...] = src.reshape(sv.shape)  # copy out
    if inplace:
        lib.touched([x])
    return out


def _clip_integers(sv: np.ndarray, out_sv: np.ndarray, lo: float | None, hi: float | None) -> None:
    if sv.dtype.kind == "b":  # bool: clamp 0/1 as int8 within [0, 1], then back to bool
        lo_b, hi_b = int_bound(lo, 0, 1, True), int_bound(hi, 0, 1, False)
        out_sv[...] = np.clip(sv.astype(np.int8), lo_b, hi_b) != 0
        return
    info = np.iinfo(sv.dtype)
    lo_v = int_bound(lo, int(info.min), int(info.max), True)
    hi_v = int_bound(hi, int(info.min), int(info.max), False)
    if lo_v is None and hi_v is None:
        out_sv[...] = sv
        return
    np.clip(sv, lo_v, hi_v, out=out_sv)


def global_norm(
    lib: Any, arrays: Sequence[Any], ord_code: int, p: float, per_array: bool = False
) -> Any:
    """The global norm; with ``per_array``, ``(total, per-array norms)`` from the same pass."""
    packed = pack(lib, arrays, "norm", writing=False)
    assert packed.dtype is not None
    if not per_array:
        return lib.wrap(packed.norm(ord_code, p), packed.dtype, arrays[0])
    value, per = _per_array.norms(packed, len(arrays), ord_code, p)
    return lib.wrap(value, packed.dtype, arrays[0]), lib.wrap(per, packed.dtype, arrays[0])


def clip_global(
    lib: Any,
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
    """Global-norm clipping of a list: returns (outputs, total norm before clipping),
    and with ``per_array`` also the per-array norms before clipping."""
    what = "clip_by_global_norm"
    if not inplace:
        src = pack(lib, arrays, what, writing=False)
        outs = [lib.empty_like(a) for a in arrays]
        dst = pack(lib, outs, what, writing=False)
        value, per = _norms(
            src, len(arrays), ord_code, p, total_norm, error_if_nonfinite, per_array
        )
        coef, coef2 = _coefficients(value, max_norm, eps, "clip")
        _scale_into(src, dst, coef)
        if coef2 != 1.0:
            dst.scale(coef2)
        return _result(outs, _wrapped(lib, src, arrays[0], value, per))

    if len(arrays) == 1 and total_norm is None and not error_if_nonfinite:
        out, norm_value = rescale(lib, arrays[0], ord_code, p, None, max_norm, eps, "clip", True)
        return ([out], norm_value, norm_value.reshape(1)) if per_array else ([out], norm_value)
    packed = pack(lib, arrays, what, writing=True)
    per = None
    fused: float | None = None
    if (
        len(packed.tables) == 1
        and not packed.copies
        and total_norm is None
        and not error_if_nonfinite
        and not needs_rescale(ord_code, False)
        # float64 per-array norms and complex128 take the launches below
        and (packed.dtype != np.float64 or not per_array)
        and packed.tables[0].like.dtype != np.complex128
    ):
        t = packed.tables[0]
        if packed.dtype == np.float64:  # two-factor coefficients, robust_norm's rescaling
            fused = _table_wide(packed, ord_code, p, max_norm, eps)
        elif per_array:  # the same fused launch, also keeping each array's power sum
            fused, per = _per_array.clip_with_norms(t, ord_code, p, max_norm, eps)
        else:
            args = (t.addrs, t.sizes, t.like, ord_code, p, max_norm, eps, cfg.CHUNK)
            fused = float(run("tab_clip", t.n, *args))
    if fused is not None:
        value = fused
    else:
        value, per = _norms(
            packed, len(arrays), ord_code, p, total_norm, error_if_nonfinite, per_array
        )
        coef, coef2 = _coefficients(value, max_norm, eps, "clip")
        packed.scale(coef)
        if coef2 != 1.0:
            packed.scale(coef2)
    lib.touched(arrays)
    return _result(arrays, _wrapped(lib, packed, arrays[0], value, per))


def _result(outs: list[Any], norms: tuple[Any, Any]) -> tuple[Any, ...]:
    """(outputs, total) or, with per-array norms, (outputs, total, per)."""
    return (outs, norms[0]) if norms[1] is None else (outs, *norms)


def _wrapped(lib: Any, packed: Packed, like: Any, value: float, per: Any) -> tuple[Any, Any]:
    assert packed.dtype is not None
    total = lib.wrap(value, packed.dtype, like)
    return total, None if per is None else lib.wrap(per, packed.dtype, like)


def _norms(
    packed: Packed,
    n: int,
    ord_code: int,
    p: float,
    total_norm: float | None,
    error_if_nonfinite: bool,
    per_array: bool,
) -> tuple[float, Any]:
    """(total norm, float64 per-array norms or None), raising NonFiniteNormError
    (with the arrays whose norms are not finite) before anything is written."""
    per = None
    if per_array or (error_if_nonfinite and total_norm is None):
        value, per = _per_array.norms(packed, n, ord_code, p)  # the same single pass
    else:
        value = packed.norm(ord_code, p) if total_norm is None else total_norm
    if total_norm is not None:
        value = total_norm
    if error_if_nonfinite and not math.isfinite(value):
        if per is None:  # a given non-finite total: find the culprits, if any (one pass)
            per = _per_array.norms(packed, n, ord_code, p)[1]
        raise nonfinite_error(value, _per_array.nonfinite_indices(per))
    return value, per if per_array else None


def _scale_into(src: Packed, dst: Packed, coef: float) -> None:
    for ts, td in zip(src.tables, dst.tables):
        run("tab_scale", ts.n, ts.addrs, td.addrs, ts.sizes, ts.like, coef, False, cfg.CHUNK)


def clamp_many_(lib: Any, arrays: list[Any], lo: float | None, hi: float | None) -> None:
    packed = pack(lib, arrays, "clip_by_value", writing=True)
    packed.clamp(-math.inf if lo is None else lo, math.inf if hi is None else hi)
    lib.touched(arrays)


def scale_(lib: Any, arrays: list[Any], factor: float) -> None:
    packed = pack(lib, arrays, "scale", writing=True)
    packed.scale(factor)
    lib.touched(arrays)
