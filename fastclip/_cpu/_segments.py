# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""The segment primitives every CPU kernel is built from: helpers only, no kernels.

Every reduction returns a float64 "power sum": sum |x|**p for finite p, or
max |x| for p = inf (``ord_code`` 0 = inf, 1 = L1, 2 = L2, 3 = any other p).

Accuracy without losing speed (measured: ``BLOCK`` below): elements are summed in the
accumulator type of their storage (float32 for 32- and 16-bit data) inside
blocks of ``BLOCK`` elements, and block sums are combined in float64.  A block
whose float32 sum is not finite is summed again in float64, so large finite
values (|x| ~ 1e20) never overflow to inf, while real inf/NaN still propagate.

The kernels themselves (``_kernels``: one array and tables of arrays;
``_axis_kernels``: rows and columns of one array) call these on a segment
``a[lo:hi]`` of a 1-D array; ``chunk_starts`` / ``table_row`` map a table
kernel's chunk index to its array.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._elements import abs1, abs2, abs64, acc_limit, acc_tiny, acc_zero, coef_like, narrow, widen
from ._intrinsics import empty_i64, imin

BLOCK = 4096  # float32 partial-sum block (error ~2e-10 rel. on 6.4e7 elements)

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # no nnan/ninf: keep isfinite checks

# Helpers called only from other kernels need neither the CPython nor the C
# entry point numba builds for every function: without them a cold
# ``clip_by_global_norm_`` compiles less code (3.2-3.7 -> 3.1-3.3 s of CPU
# time, ``python benchmarks/bench_first_call.py``).
INNER = dict(no_cfunc_wrapper=True, no_cpython_wrapper=True)
# The smallest helpers (``combine``, ``coefficient``, ``root``, ``chunk_starts``)
# are inlined instead: no function of their own to compile (23 -> 19 functions
# compiled by that call, CPU time 3.27-3.39 -> 3.09-3.18 s on a busy machine).


@njit(error_model="numpy", fastmath=FASTMATH, cache=False, inline="always")
def _block_sum_p(b, ord_code, p, inv):  # type: ignore[no-untyped-def]
    """float64 sum of |x|**p over the whole 1-D block ``b`` (ord_code 1/2/3).

    Loops run over ``range(b.size)`` of a slice: indexing with ``range(lo, hi)``
    keeps numba's negative-index wraparound in the loop and stops LLVM from
    vectorising it (measured 10x slower).
    """
    acc = acc_zero(b[0])
    if ord_code == 2:
        for i in range(b.size):
            acc += abs2(widen(b[i]))
    elif ord_code == 1:
        for i in range(b.size):
            acc += abs1(widen(b[i]))
    else:
        acc64 = 0.0
        for i in range(b.size):
            acc64 += (abs64(widen(b[i])) * inv) ** p
        return acc64
    if acc <= acc_limit(b[0]) and (ord_code != 2 or acc >= acc_tiny(b[0])):
        return np.float64(acc)
    # Overflowed, NaN, or squares that may have underflowed float32 (|x| < ~1e-19):
    # redo this block in float64.  The block is in L1 cache by now, so the rare
    # redo (all-zero blocks included) costs a fraction of the memory pass.
    acc64 = 0.0
    if ord_code == 2:
        for i in range(b.size):
            v = abs64(widen(b[i]))  # widen before squaring
            acc64 += v * v
    else:
        for i in range(b.size):
            acc64 += abs64(widen(b[i]))
    return acc64


@njit(error_model="numpy", fastmath=FASTMATH, cache=False, **INNER)
def seg_pow_sum(a, lo, hi, ord_code, p, inv):  # type: ignore[no-untyped-def]
    """Power sum (or max |x| for ord_code 0) of the 1-D array a[lo:hi]."""
    if hi <= lo:
        return 0.0
    seg = a[lo:hi]
    if ord_code == 0:
        m = 0.0
        nan = False
        for i in range(seg.size):
            v = abs64(widen(seg[i]))
            if v > m:
                m = v
            if v != v:
                nan = True
        return np.nan if nan else m
    total = 0.0
    nblocks = (seg.size + BLOCK - 1) // BLOCK
    for b in range(nblocks):
        s = b * BLOCK
        total += _block_sum_p(seg[s : imin(s + BLOCK, seg.size)], ord_code, p, inv)
    return total


@njit(error_model="numpy", cache=False, inline="always")
def combine(partials, ord_code):  # type: ignore[no-untyped-def]
    """Combine per-chunk power sums (max for inf, NaN-propagating)."""
    total = 0.0
    if ord_code == 0:
        for v in partials:
            if v > total or v != v:
                total = v
            if total != total:
                break
        return total
    for v in partials:
        total += v
    return total


@njit(error_model="numpy", fastmath=FASTMATH, cache=False, **INNER)
def seg_scale(src, dst, lo, hi, coef, inplace):  # type: ignore[no-untyped-def]
    """dst[lo:hi] = src[lo:hi] * coef, never losing the coefficient to float32's range.

    Rounding a float64 coefficient to float32 flushes factors below ~1e-45 to 0
    and turns ones above ~3e38 into inf (1e30 clipped to 1e-30 came out 0),
    although the scaled values themselves are representable.  So where the
    coefficient is not a normal number of the data's arithmetic type, the
    product is taken in float64 and rounded once.  Otherwise the product stays
    in that type (float32 for 16/32-bit data, as torch's ``clip_grad_norm_``
    does): within one ulp of the float64 product, and a float64 multiply of
    float32 data measured 25-30% slower on 1e7 elements (``clip_by_norm_``,
    2.8-3.0 ms against 3.75 ms, two threads).

    The in-place loop is separate: with ``src is dst`` LLVM's runtime alias
    check fails and the two-array loop runs scalar (measured 2.5x slower).
    """
    if hi <= lo:
        return
    d = dst[lo:hi]
    c = np.float64(coef)
    cw = coef_like(c, d[0])
    if normal_in_type(cw, c):
        if inplace:  # read and write ``dst`` only: ``src`` may be a read-only view
            for i in range(d.size):
                d[i] = narrow(widen(d[i]) * cw, d[i])
        else:
            s = src[lo:hi]
            for i in range(s.size):
                d[i] = narrow(widen(s[i]) * cw, d[i])
    elif inplace:
        for i in range(d.size):
            d[i] = narrow(widen(d[i]) * c, d[i])
    else:
        s = src[lo:hi]
        for i in range(s.size):
            d[i] = narrow(widen(s[i]) * c, d[i])


@njit(error_model="numpy", fastmath=FASTMATH, cache=False, inline="always")
def normal_in_type(cw, c):  # type: ignore[no-untyped-def]
    """Whether the coefficient ``c``, as ``cw`` in the data's arithmetic type, kept its
    value to within rounding: equal (float64 data, 0, inf, NaN) or a normal
    float32 (no flush to 0 or inf, no subnormal loss of digits)."""
    a = abs(np.float64(cw))
    return cw == c or c != c or (a >= 1.1754943508222875e-38 and a <= 3.4028234663852886e38)


@njit(error_model="numpy", fastmath=FASTMATH, cache=False, **INNER)
def seg_clamp(src, dst, lo, hi, vmin, vmax, inplace):  # type: ignore[no-untyped-def]
    """dst[lo:hi] = clamp(src[lo:hi], vmin, vmax); NaN stays NaN.

    Conditional expressions compile to vector selects (if-statements measured
    2x slower); the in-place loop touches ``dst`` only so LLVM sees no aliasing.
    """
    if hi <= lo:
        return
    d = dst[lo:hi]
    cmin = coef_like(vmin, d[0])
    cmax = coef_like(vmax, d[0])
    if inplace:
        for i in range(d.size):
            v = widen(d[i])
            v = cmin if v < cmin else v
            v = cmax if v > cmax else v
            d[i] = narrow(v, d[i])
    else:
        s = src[lo:hi]
        for i in range(s.size):
            v = widen(s[i])
            v = cmin if v < cmin else v
            v = cmax if v > cmax else v
            d[i] = narrow(v, d[i])


@njit(error_model="numpy", cache=False, inline="always")
def coefficient(norm, max_norm, eps):  # type: ignore[no-untyped-def]
    """min(1, max_norm / (norm + eps)) without a branch on NaN (NaN propagates);
    1 for a zero norm with eps = 0 (nothing to clip)."""
    den = norm + eps
    r = max_norm / den
    return 1.0 if (r >= 1.0 or den == 0.0) else r


@njit(error_model="numpy", cache=False, inline="always")
def root(total, ord_code, p):  # type: ignore[no-untyped-def]
    """Power sum -> norm."""
    if ord_code == 0:
        return total
    if ord_code == 1:
        return total
    if ord_code == 2:
        return np.sqrt(total)
    return total ** (1.0 / p)


@njit(error_model="numpy", cache=False, inline="always")
def chunk_starts(sizes, chunk):  # type: ignore[no-untyped-def]
    """Prefix sums of chunk counts: chunk c belongs to row ``table_row(starts, c)``."""
    starts = empty_i64(sizes.size + 1)
    starts[0] = 0
    for t in range(sizes.size):
        starts[t + 1] = starts[t] + (sizes[t] + chunk - 1) // chunk
    return starts


@njit(error_model="numpy", cache=False, inline="always")
def table_row(starts, c):  # type: ignore[no-untyped-def]
    """The table row of chunk ``c``: the last t with starts[t] <= c.

    That is ``np.searchsorted(starts, c, side="right") - 1``, bisected here:
    numba's ``np.searchsorted`` compiles six functions (0.3 s of a cold first
    ``clip_by_global_norm_``), and loading its cached code imports
    ``numba.np.arraymath``, hence ``scipy.linalg`` (0.3-0.4 s of a warm one;
    ``python benchmarks/bench_first_call.py``).  Rows of zero chunks share
    their start with the next row, which this skips, as searchsorted does.
    """
    lo = 0
    hi = starts.size  # starts[lo] <= c < starts[hi] (past the end counts as +inf)
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if starts[mid] <= c:
            lo = mid
        else:
            hi = mid
    return lo


_BIG = 2.0**1000  # coefficient_parts' 2**log2_split for float64 coefficients


@njit(error_model="numpy", cache=False, **INNER)
def coefficient_parts64(norm, max_norm, eps):  # type: ignore[no-untyped-def]
    """``_formulas.coefficient_parts(norm, max_norm, eps, "clip")`` of one float64
    norm: ``(c, c2)``, ``c2`` = 2**-1000 where ``max_norm / (norm + eps)`` lies
    below 2**-1000, else 1.

    Not inlined, and compiled without fast-math flags: inlined into the
    kernels' ``arcp`` code, a division may become a multiply by a reciprocal
    and round differently from NumPy's division.
    """
    den = norm + eps
    r = max_norm / den
    base = 1.0 if (r >= 1.0 or den == 0.0) else r
    if max_norm > 0.0 and den == den and den < np.inf and den / _BIG > max_norm:
        return (max_norm * _BIG) / den, 1.0 / _BIG
    return base, 1.0


@njit(error_model="numpy", cache=False, **INNER)
def pow2_inverse64(m):  # type: ignore[no-untyped-def]
    """``_formulas.pow2_inverse`` of one float64 (a power of two, exact)."""
    e = -math.frexp(m)[1]
    e = -1022 if e < -1022 else e
    return math.ldexp(1.0, 1023 if e > 1023 else e)
