"""The Dask route's per-block maths: functions that run on one NumPy block inside a graph.

Power sums (``max |x|`` for ``ord=inf``) of a block along the reduction axes, the
``(m, s)`` pairs with ``sum |x|^p = m^p * s`` that survive float64 over/underflow,
their combination across blocks, the clip coefficients and the scaling of a block
by its slice of them (see the notes of ``fastclip._dask``).  Every kernel comes
from the CPU route, and this is the one module of the Dask route that imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _config as cfg

# The CPU route's names used by the Dask route, all imported here (``__init__`` takes
# ``refuse_dtype`` from this module): its kernel launcher, per-axis plan, NumPy adapter,
# dtype rules and clip by value.
from .. import _cpu
from .._cpu import AxisPlan, NumpyLib, norm_dtype, refuse_dtype
from .._formulas import SAFE_HI, SAFE_LO, coefficient_parts, needs_rescale, pow2_inverse, root

__all__ = [
    "FLOATS",
    "PAIR",
    "block_pairs",
    "block_pow_sums",
    "clip_block",
    "coefficients",
    "combine_root",
    "combine_root_pairs",
    "out_dtype",
    "pairs_norm",
    "refuse_dtype",
    "rooted_sums",
    "scale_block",
    "uses_pairs",
]

#: The dtypes the norm and scale kernels read (native byte order).
FLOATS = frozenset(
    np.dtype(t) for t in (np.float16, np.float32, np.float64, np.complex64, np.complex128)
)


def out_dtype(x: Any) -> np.dtype:
    """The norm dtype of ``x``'s data, as on the CPU route."""
    return norm_dtype(NumpyLib.storage(np.empty(0, x.dtype)).dtype)


def plan_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with the reduced ``axes`` kept as 1 (keepdims)."""
    return tuple(1 if i in axes else s for i, s in enumerate(shape))


# ------------------------------------------------------------ power sums


def _summer(
    sv: np.ndarray, axis: tuple[int, ...], shape: tuple[int, ...], p: float
) -> Callable[[int, np.ndarray | None], np.ndarray]:
    """``pow_sums(ord_code, inv)``: float64 power sums of storage ``sv`` along ``axis``.

    Shaped ``shape`` (keepdims); ``inv`` scales the data first (keepdims-shaped over
    the whole array, flat per slice), as the CPU kernels do.
    """
    whole = len(axis) == sv.ndim
    flat = sv.reshape(-1) if whole else None
    plan = None if whole else AxisPlan(sv, tuple(sorted(axis)))

    def pow_sums(pc: int, inv: np.ndarray | None) -> np.ndarray:
        if plan is not None:
            return np.asarray(plan.pow_sums(pc, p, inv), np.float64).reshape(shape)
        assert flat is not None
        scale = 1.0 if inv is None else float(inv.reshape(-1)[0])
        value = _cpu.run("arr_pow_sum", flat.size, flat, pc, p, scale, cfg.CHUNK)
        return np.full(shape, value, np.float64)

    return pow_sums


def block_pow_sums(
    block: np.ndarray, axis: tuple[int, ...], keepdims: bool, ord_code: int, p: float, **_: Any
) -> np.ndarray:
    """float64 power sums (max for inf) of one NumPy block along ``axis``, keepdims."""
    sv = NumpyLib.storage(np.asarray(block))
    shape = plan_shape(sv.shape, axis)
    if sv.size == 0:
        return np.zeros(shape, np.float64)
    return _summer(sv, axis, shape, p)(ord_code, None)


#: A partial power sum that survives float64 over/underflow: sum |x|^p = m^p * s.
PAIR = np.dtype([("m", np.float64), ("s", np.float64)])


def block_pairs(
    block: np.ndarray, axis: tuple[int, ...], keepdims: bool, ord_code: int, p: float, **_: Any
) -> np.ndarray:
    """Partial power sums of one block as ``(m, s)`` pairs (see the notes of ``fastclip._dask``)."""
    sv = NumpyLib.storage(np.asarray(block))
    shape = plan_shape(sv.shape, axis)
    out = np.zeros(shape, PAIR)
    if sv.size == 0:
        return out  # (0, 0): the identity
    whole = len(axis) == sv.ndim
    pow_sums = _summer(sv, axis, shape, p)

    totals = pow_sums(ord_code, None)
    m = np.where(totals == 0.0, 0.0, 1.0)
    s = totals
    bad = ~((totals > SAFE_LO) & (totals < SAFE_HI))  # 0 may be underflow
    if bad.any():
        maxes = pow_sums(0, None)
        fix = bad & (maxes > 0.0) & (maxes < math.inf)
        if fix.any():
            # A power-of-two scale, not 1 / max: that overflows for subnormal maxima
            # (see ``fastclip._formulas.pow2_inverse``); the pair's m is then 1 / inv, exactly.
            inv = np.where(fix, pow2_inverse(np.where(fix, maxes, 1.0)), 1.0)
            scaled = pow_sums(3, inv if whole else inv.reshape(-1))
            m = np.where(fix, 1.0 / inv, m)
            s = np.where(fix, scaled, s)
    out["m"] = m
    out["s"] = s
    return out


def uses_pairs(arrays: list[Any], ord_code: int) -> bool:
    """Pairs where the NumPy route would rescale (float64 L2, any other p)."""
    wide = any(out_dtype(a) == np.float64 for a in arrays)
    return needs_rescale(ord_code, wide)


# ----------------------------------------------------------- combination


def _combine_pairs(
    parts: np.ndarray, axis: tuple[int, ...], keepdims: bool, p: float
) -> np.ndarray:
    """Pairs combined along ``axis``: ``M = max m``, ``S = sum s (m / M)^p``."""
    m, s = parts["m"], parts["s"]
    big = np.max(m, axis=axis, keepdims=True)
    with np.errstate(all="ignore"):
        ratio = np.where(big > 0.0, m / np.where(big > 0.0, big, 1.0), 0.0)
        terms = np.where(np.isfinite(s), s * ratio**p, s)  # inf * 0 must stay inf
    out = np.empty(np.sum(terms, axis=axis, keepdims=keepdims).shape, PAIR)
    out["s"] = np.sum(terms, axis=axis, keepdims=keepdims)
    out["m"] = big if keepdims else np.squeeze(big, axis=axis)
    return out


def pairs_norm(pairs: np.ndarray, ord_code: int, p: float) -> np.ndarray:
    """float64 norms ``M * S^(1/p)`` of ``(M, S)`` pairs."""
    with np.errstate(all="ignore"):
        return np.asarray(pairs["m"] * root(pairs["s"], 3, p), np.float64)


def rooted_sums(sums: np.ndarray, ord_code: int, p: float) -> np.ndarray:
    """float64 norms of a block of power sums (maxima for inf)."""
    with np.errstate(all="ignore"):
        return np.asarray(root(sums, ord_code, p), np.float64)


def combine_root_pairs(
    parts: np.ndarray,
    axis: tuple[int, ...],
    keepdims: bool,
    ord_code: int,
    p: float,
    root: bool,
    **_: Any,
) -> np.ndarray:
    """Pairs combined along ``axis``; their norms with ``root``."""
    pairs = _combine_pairs(parts, axis, keepdims, p)
    return pairs_norm(pairs, ord_code, p) if root else pairs


def _combine(parts: np.ndarray, axis: tuple[int, ...], keepdims: bool, ord_code: int) -> np.ndarray:
    if ord_code == 0:
        return np.max(parts, axis=axis, keepdims=keepdims)  # NaN propagates
    return np.sum(parts, axis=axis, keepdims=keepdims)


def _aggregate(
    parts: np.ndarray, axis: tuple[int, ...], keepdims: bool, ord_code: int, p: float
) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(root(_combine(parts, axis, keepdims, ord_code), ord_code, p))


def combine_root(
    parts: np.ndarray,
    axis: tuple[int, ...],
    keepdims: bool,
    ord_code: int,
    p: float,
    root: bool,
    **_: Any,
) -> np.ndarray:
    """Power sums (maxima for inf) combined along ``axis``; their norms with ``root``."""
    if root:
        return _aggregate(parts, axis, keepdims, ord_code, p)
    return _combine(parts, axis, keepdims, ord_code)


# -------------------------------------------------------------- scaling


def coefficients(
    norms: np.ndarray, max_norm: Any, eps: float, mode: str, part: int = 0
) -> np.ndarray:
    """float64 clip (or normalize) coefficients of a block of norms (``max_norm`` a
    number or a block of bounds broadcasting to them): the first
    (``part=0``) or second factor of ``coefficient_parts``."""
    return np.asarray(coefficient_parts(norms, max_norm, eps, mode)[part], np.float64)


def scale_block(
    block: np.ndarray,
    coef: np.ndarray,
    coef2: np.ndarray | None = None,
    *,
    axes: tuple[int, ...] | None,
) -> np.ndarray:
    """``block * coef`` (then ``* coef2``, where it is not all ones) with the CPU
    scale kernels; the coefficients are 0-d or keepdims-shaped."""
    block = np.asarray(block)
    out = np.empty(block.shape, block.dtype)
    if block.size == 0:
        return out
    if coef2 is not None and np.all(np.asarray(coef2) == 1.0):
        coef2 = None
    sv, out_sv = NumpyLib.storage(block), NumpyLib.storage(out)
    if axes is None or len(axes) == sv.ndim:
        src = np.ascontiguousarray(sv).reshape(-1)
        dst = out_sv.reshape(-1)
        for i, c in enumerate((coef, coef2)):
            if c is not None:
                value = float(np.asarray(c).reshape(-1)[0])
                _cpu.run(
                    "arr_scale", src.size, src if i == 0 else dst, dst, value, i > 0, cfg.CHUNK
                )
        return out
    plan = AxisPlan(sv, axes)
    shape = plan_shape(sv.shape, axes)

    def flat(c: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(c, shape).reshape(-1)).astype(np.float64)

    plan.scale(flat(coef), out_sv, None if coef2 is None else flat(coef2))
    return out


def clip_block(block: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    """One block clipped to ``[lo, hi]`` by the CPU route (integers and bools included)."""
    return np.asarray(_cpu.clip_by_value(NumpyLib, np.asarray(block), lo, hi, False))
