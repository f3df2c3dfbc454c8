"""The formulas every route shares, written once: the clip coefficient, the root
of a power sum, and the rescaled norm for power sums beyond float64's range.

A leaf: imports nothing from fastclip (NumPy and ``math`` only).

The clip coefficient is ``min(1, max_norm / (norm + eps))``, torch's
``clip_grad_norm_`` formula (``clip_coef = max_norm / (total_norm + 1e-6)``,
clamped to 1).  Its one special case, the **zero-norm rule**: when
``norm + eps == 0`` (a zero norm with ``eps = 0``) the quotient is ``0 / 0`` or
``c / 0``, and the coefficient is 1 (nothing to clip).  A zero norm with
``eps > 0`` follows the formula, so ``max_norm = 0`` gives 0 as in torch and
Opacus (``(max_grad_norm / (norms + 1e-6)).clamp(max=1.0)``).  NaN propagates
(``NaN >= 1`` is false) and an infinite norm gives 0.  The CUDA kernels
(``_gpu/*.cu``) and the Numba kernels (``_cpu/_segments.py``,
``_cpu/_optim_kernels.py``) write the same rule in their own languages;
``tests/api/test_zero_norm_rule.py`` checks every route against this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "SAFE_HI",
    "SAFE_LO",
    "clip_coefficient",
    "clip_coefficients",
    "coefficient_parts",
    "combine_parts",
    "int_bound",
    "needs_rescale",
    "per_sample_norms_and_factors",
    "per_sample_rescaler",
    "pow2_inverse",
    "robust_norm",
    "root",
]


def clip_coefficient(max_norm: float, norm: float, eps: float) -> float:
    """``min(1, max_norm / (norm + eps))`` for Python floats, with the zero-norm rule."""
    den = norm + eps
    r = max_norm / den if den != 0 else math.inf
    return 1.0 if r >= 1.0 else r


def clip_coefficients(
    norms: Any, max_norm: Any, eps: float, mode: str = "clip", xp: Any = None
) -> Any:
    """The coefficients of many norms, elementwise, in the array library ``xp``.

    ``mode="clip"``: ``min(1, max_norm / (norm + eps))`` with the zero-norm
    rule (``max_norm`` may be an array of per-row bounds);
    ``mode="normalize"``: ``1 / (norm + eps)``.  Without ``xp`` the norms are
    taken as float64 NumPy values.  The result stays an array of ``norms``'
    library and device: no host synchronisation for device arrays.
    """
    if xp is None:
        xp, norms = np, np.asarray(norms, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        den = norms + eps
        if mode == "normalize":
            return 1.0 / den
        # No branch on the value: the coefficient is multiplied in even when it is 1,
        # as torch's clip_grad_norm_ does to avoid a host synchronisation.
        r = max_norm / den
        one = xp.ones_like(r)
        return xp.where((r >= one) | (den == 0), one, r)


def coefficient_parts(
    norms: Any,
    max_norm: Any,
    eps: float,
    mode: str = "clip",
    xp: Any = None,
    log2_split: int = 1000,
) -> tuple[Any, Any]:
    """The coefficient as a product ``c * c2`` of two factors that stay in range.

    ``c2`` is a power of two, 1 except where the quotient ``num / den`` (``num``
    is ``max_norm``, 1 for ``mode="normalize"``; ``den = norm + eps``) lies
    beyond ``2**±log2_split``: there one factor rounded to float64 would be
    subnormal, 0 or inf although the scaled data are representable (float64
    data of norm 1e300 clipped to 1e-300 became 0; data of subnormal norm
    normalised became NaN and inf).  ``(x * c) * c2`` is then exact up to one
    rounding: the powers of two scale exactly, and ``x * c`` stays in range
    because ``|x| <= norm``.  Elementwise; ``c`` is ``clip_coefficients``'
    value wherever ``c2`` is 1.  ``log2_split``: 1000 for float64
    coefficients, 100 where the namespace computes in float32 (``c`` and
    ``c2`` both normal for quotients down to 2**-2022, resp. 2**-226).
    """
    if xp is None:
        xp, norms = np, np.asarray(norms, np.float64)
    base = clip_coefficients(norms, max_norm, eps, mode, xp=xp)
    big = 2.0**log2_split
    if xp is np and np.ndim(max_norm) == 0 and norms.size:
        # NumPy values (the CPU route's per-slice norms): two reductions decide that
        # no quotient leaves the range, which is nearly always so; the masks below
        # cost 4x clip_coefficients (32 us against 8 us for 256 norms)
        with np.errstate(over="ignore", invalid="ignore"):
            den_lo, den_hi = float(norms.min()) + eps, float(norms.max()) + eps
            num = 1.0 if mode == "normalize" else float(max_norm)
            fits = math.isfinite(den_hi) and not (num > 0 and den_hi / big > num)
            if fits and (mode != "normalize" or den_lo * big >= 1.0):
                return base, np.ones_like(base)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        den = norms + eps
        num = 1.0 if mode == "normalize" else max_norm
        finite = (den == den) & (den < math.inf)
        # num / den < 2**-log2_split: num * big cannot overflow (num < den / big)
        under = (num > 0) & finite & (den / big > num)
        # num / den > 2**log2_split: only a normalisation keeps it (a clip gives 1)
        over = (den > 0) & (den * big < num) if mode == "normalize" else under & ~under
        one = xp.ones_like(base)
        c = xp.where(under, (num * big) / den, xp.where(over, (num / big) / den, base))
        c2 = xp.where(under, one / big, xp.where(over, one * big, one))
    return c, c2


def root(total: Any, ord_code: int, p: float) -> Any:
    """The norm from a power sum: ``total`` for max (ord_code 0) and L1 (ord_code 1),
    ``sqrt`` for L2 (ord_code 2), ``total ** (1/p)`` otherwise (ord_code 3)."""
    if ord_code in (0, 1):
        return total
    if ord_code == 2:
        return np.sqrt(total)
    with np.errstate(all="ignore"):
        return np.power(total, 1.0 / p)


# Power sums outside this range may have lost precision to float64 under- or
# overflow (float64 L2 of |x| < 1e-140 or > 1e140, any p > 0 at other ranges);
# the norm is then recomputed as max|x| * (sum (|x| / max|x|)^p)^(1/p).
SAFE_LO, SAFE_HI = 1e-280, 1e280


def needs_rescale(ord_code: int, wide: bool) -> bool:
    """float32 L1/L2 sums cannot leave the safe range; float64 L2 and any other p can."""
    return ord_code == 3 or (ord_code == 2 and wide)


def pow2_inverse(m: Any) -> Any:
    """A power of two ``inv`` with ``m * inv`` near 1, for max-rescaling (elementwise).

    ``1 / m`` itself is no good: for a subnormal ``m`` (float64 below 2.2e-308) it
    overflows to inf, and the rescaled norm became inf (then clipping zeroed the
    data).  ``inv = 2**k`` with ``k`` kept in [-1022, 1023] is finite, and so is
    ``1 / inv``; both are exact, so scaling by them loses no bits.  ``m * inv`` lies
    in [0.5, 1) except at the very ends of the range: down to 2**-51 for the
    smallest subnormals (their squares, 2**-102, are still normal) and up to 4
    next to float64's maximum.
    """
    _, e = np.frexp(m)
    return np.ldexp(1.0, np.clip(-e, -1022, 1023))


def robust_norm(
    pow_sum: Callable[[int, float, float], float], ord_code: int, p: float, wide: bool
) -> float:
    """Norm from ``pow_sum(ord_code, p, inv) -> float``, rescaled when it over/underflows.

    ``pow_sum(pc, p, inv)`` returns ``sum (|x| * inv)**p`` for pc 3 (max |x| for
    pc 0); the rescaled norm is ``(sum (|x| * inv)**p)**(1/p) / inv`` with ``inv``
    a power of two from ``pow2_inverse`` (so it is finite even for subnormal data).
    """
    total = float(pow_sum(ord_code, p, 1.0))
    if needs_rescale(ord_code, wide) and not SAFE_LO < total < SAFE_HI:
        m = float(pow_sum(0, p, 1.0))
        if 0.0 < m < math.inf:
            inv = float(pow2_inverse(m))
            return float(root(float(pow_sum(3, p, inv)), 3, p)) / inv
    return float(root(total, ord_code, p))


def int_bound(v: float | None, lo_end: int, hi_end: int, lower: bool) -> int | None:
    """A float bound for integer data in [lo_end, hi_end], or None for no bound.

    Same result as clipping in float64 and converting back with saturation: a
    lower bound rounds up, an upper bound down; -inf below (inf above) is no
    bound at all, and a bound beyond the integer range (inf, 1e30 on int8)
    saturates at the range's end instead of overflowing.
    """
    if v is None or math.isnan(v):
        return None
    if math.isinf(v):
        if (v < 0) == lower:  # -inf as a lower bound, inf as an upper one
            return None
        return hi_end if v > 0 else lo_end
    i = math.ceil(v) if lower else math.floor(v)
    return min(max(i, lo_end), hi_end)


# ---------------------------------------------------- per-sample clipping
# Shared by the CPU and generic routes (the GPU route runs the same rules in
# _gpu/per_sample_kernels.cu).


def per_sample_norms_and_factors(
    sums: np.ndarray,
    ord_code: int,
    p: float,
    bounds: np.ndarray,
    per_layer: bool,
    eps: float,
    fix: Any = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """[n, B] power sums -> norms ([B] or [n, B]), factors [n, B], count clipped.

    ``fix(norms, totals)``, if given, replaces in place the norms of samples whose
    power sums over/underflowed (``per_sample_rescaler``).
    """
    if per_layer:
        norms = root(sums, ord_code, p)
        if fix is not None:
            fix(norms, sums)
        factors = clip_coefficients(norms, bounds[:, None], eps)
        clipped = int(np.count_nonzero((factors < 1.0).any(axis=0)))
        return norms, factors, clipped
    total = combine_parts(sums, ord_code)
    norms = root(total, ord_code, p)
    if fix is not None:
        fix(norms, total)
    f = clip_coefficients(norms, bounds[0], eps)
    return norms, np.broadcast_to(f, sums.shape), int(np.count_nonzero(f < 1.0))


def combine_parts(values: Any, ord_code: int) -> Any:
    """Power sums of the parts of a sample (axis 0) -> the sample's: max for inf, else sum."""
    return np.max(values, axis=0) if ord_code == 0 else np.sum(values, axis=0)


def per_sample_rescaler(
    ord_code: int, p: float, wide: bool, per_layer: bool, n_arrays: int, rows_pow_sum: Any
) -> Any:
    """A ``fix`` for ``per_sample_norms_and_factors``: the core's ``robust_norm`` rule per sample.

    ``rows_pow_sum(k, rows, pc, pp, inv)`` gives the power sums of rows
    ``rows`` (int64 indices) of array ``k``, row ``rows[i]`` scaled by
    ``inv[i]``.  Only samples outside the range where the float64 power sum
    is exact are looked at again, so the common case costs one vectorised
    range test.  Their max |x| comes from one call per array; a max of 0
    (all zeros), NaN or inf already has its exact norm from pass 1 (0, NaN,
    inf), and every other such sample gets ``robust_norm`` itself (one rule
    for every route).  None when ``ord_code`` and the dtypes cannot leave the
    range (float32 L1/L2, the max-norm).
    """

    if not needs_rescale(ord_code, wide):
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
            maxes[rows] = combine_parts(np.array(parts), 0)
        with np.errstate(invalid="ignore"):
            finite_nonzero = bad & (maxes > 0.0) & (maxes < math.inf)
        for index in zip(*np.nonzero(finite_nonzero)):
            parts_k = (int(index[0]),) if per_layer else tuple(range(n_arrays))
            # what robust_norm asks first was already computed: no second pass for them
            known = {(ord_code, p, 1.0): float(totals[index]), (0, p, 1.0): float(maxes[index])}
            pow_sum = _sample_pow_sum(rows_pow_sum, parts_k, int(index[-1]), known)
            norms[index] = robust_norm(pow_sum, ord_code, p, wide)

    return fix


def _sample_pow_sum(rows_pow_sum: Any, parts: tuple[int, ...], b: int, known: dict) -> Any:
    """``robust_norm``'s ``pow_sum(pc, pp, inv)`` for sample ``b`` over arrays ``parts``."""
    row = np.array([b], np.int64)

    def pow_sum(pc: int, pp: float, inv: float) -> float:
        key = (pc, pp, inv)
        if key not in known:
            values = [float(rows_pow_sum(k, row, pc, pp, np.full(1, inv))[0]) for k in parts]
            known[key] = float(combine_parts(np.array(values, np.float64), pc))
        return float(known[key])

    return pow_sum
