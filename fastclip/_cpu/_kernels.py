# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Numba CPU kernels: tiny scalar loops, no validation (``_core`` and ``_pack`` validate).

Every reduction returns a float64 "power sum": sum |x|**p for finite p, or
max |x| for p = inf (``ord_code`` 0 = inf, 1 = L1, 2 = L2, 3 = any other p).

Accuracy without losing speed (measured: ``BLOCK`` below): elements are summed in the
accumulator type of their storage (float32 for 32- and 16-bit data) inside
blocks of ``BLOCK`` elements, and block sums are combined in float64.  A block
whose float32 sum is not finite is summed again in float64, so large finite
values (|x| ~ 1e20) never overflow to inf, while real inf/NaN still propagate.

Kernels come in two flavours built from the same Python source by
``_build.py``: serial and ``parallel=True`` (a ``prange`` over chunks of
``chunk`` elements).  Multi-array kernels take a table of raw addresses and
sizes, so N arrays cost one launch (apex ``multi_tensor_apply`` in spirit).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from ._elements import abs1, abs2, abs64, acc_limit, acc_tiny, acc_zero, coef_like, narrow, widen
from ._intrinsics import address_as_pointer, empty_f64, empty_i64, imin

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


# ---------------------------------------------------------------- one array


def arr_pow_sum(a, ord_code, p, inv, chunk):  # type: ignore[no-untyped-def]
    """Power sum of a 1-D array, chunk-parallel."""
    n = a.size
    nchunks = (n + chunk - 1) // chunk
    partials = empty_f64(nchunks)
    for c in prange(nchunks):
        lo = c * chunk
        partials[c] = seg_pow_sum(a, lo, imin(lo + chunk, n), ord_code, p, inv)
    return combine(partials, ord_code)


def arr_scale(src, dst, coef, inplace, chunk):  # type: ignore[no-untyped-def]
    """dst = src * coef for 1-D arrays (dst may be src)."""
    n = src.size
    nchunks = (n + chunk - 1) // chunk
    for c in prange(nchunks):
        lo = c * chunk
        seg_scale(src, dst, lo, imin(lo + chunk, n), coef, inplace)


def arr_clip(src, dst, ord_code, p, max_norm, eps, inplace, chunk):  # type: ignore[no-untyped-def]
    """Fused norm + clip of one 1-D array: returns the norm before clipping."""
    n = src.size
    nchunks = (n + chunk - 1) // chunk
    partials = empty_f64(nchunks)
    for c in prange(nchunks):
        lo = c * chunk
        partials[c] = seg_pow_sum(src, lo, imin(lo + chunk, n), ord_code, p, 1.0)
    norm = root(combine(partials, ord_code), ord_code, p)
    coef = coefficient(norm, max_norm, eps)
    for c in prange(nchunks):
        lo = c * chunk
        seg_scale(src, dst, lo, imin(lo + chunk, n), coef, inplace)
    return norm


def arr_clamp(src, dst, vmin, vmax, inplace, chunk):  # type: ignore[no-untyped-def]
    """dst = clamp(src, vmin, vmax) for 1-D arrays."""
    n = src.size
    nchunks = (n + chunk - 1) // chunk
    for c in prange(nchunks):
        lo = c * chunk
        seg_clamp(src, dst, lo, imin(lo + chunk, n), vmin, vmax, inplace)


# ------------------------------------------------------- many arrays (table)


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


def tab_pow_sum(addrs, sizes, like, ord_code, p, inv, chunk):  # type: ignore[no-untyped-def]
    """Power sum over all elements of all arrays in the (address, size) table."""
    starts = chunk_starts(sizes, chunk)
    nchunks = starts[-1]
    partials = empty_f64(nchunks)
    for c in prange(nchunks):
        t = table_row(starts, c)
        a = carray(address_as_pointer(addrs[t], like), sizes[t])
        lo = (c - starts[t]) * chunk
        partials[c] = seg_pow_sum(a, lo, imin(lo + chunk, sizes[t]), ord_code, p, inv)
    return combine(partials, ord_code)


def tab_scale(src_addrs, dst_addrs, sizes, like, coef, inplace, chunk):  # type: ignore[no-untyped-def]
    """dst_t = src_t * coef for every table row (in place when addresses match)."""
    starts = chunk_starts(sizes, chunk)
    nchunks = starts[-1]
    for c in prange(nchunks):
        t = table_row(starts, c)
        src = carray(address_as_pointer(src_addrs[t], like), sizes[t])
        dst = carray(address_as_pointer(dst_addrs[t], like), sizes[t])
        lo = (c - starts[t]) * chunk
        seg_scale(src, dst, lo, imin(lo + chunk, sizes[t]), coef, inplace)


def tab_clip(addrs, sizes, like, ord_code, p, max_norm, eps, chunk):  # type: ignore[no-untyped-def]
    """Fused global-norm clip of one dtype group, in place; returns the norm."""
    starts = chunk_starts(sizes, chunk)
    nchunks = starts[-1]
    partials = empty_f64(nchunks)
    for c in prange(nchunks):
        t = table_row(starts, c)
        a = carray(address_as_pointer(addrs[t], like), sizes[t])
        lo = (c - starts[t]) * chunk
        partials[c] = seg_pow_sum(a, lo, imin(lo + chunk, sizes[t]), ord_code, p, 1.0)
    norm = root(combine(partials, ord_code), ord_code, p)
    coef = coefficient(norm, max_norm, eps)
    for c in prange(nchunks):
        t = table_row(starts, c)
        a = carray(address_as_pointer(addrs[t], like), sizes[t])
        lo = (c - starts[t]) * chunk
        seg_scale(a, a, lo, imin(lo + chunk, sizes[t]), coef, True)
    return norm


def tab_clamp(src_addrs, dst_addrs, sizes, like, vmin, vmax, inplace, chunk):  # type: ignore[no-untyped-def]
    """dst_t = clamp(src_t, vmin, vmax) for every table row."""
    starts = chunk_starts(sizes, chunk)
    nchunks = starts[-1]
    for c in prange(nchunks):
        t = table_row(starts, c)
        src = carray(address_as_pointer(src_addrs[t], like), sizes[t])
        dst = carray(address_as_pointer(dst_addrs[t], like), sizes[t])
        lo = (c - starts[t]) * chunk
        seg_clamp(src, dst, lo, imin(lo + chunk, sizes[t]), vmin, vmax, inplace)


# ------------------------------------------------------------ along an axis


def rows_pow_sum(x, ord_code, p, inv):  # type: ignore[no-untyped-def]
    """Power sum of each row of a 2-D array (reduction over the last axis).

    ``inv[r]`` scales row r's values for ord_code 3 (over/underflow-safe rescaling).
    """
    m, k = x.shape
    out = empty_f64(m)
    for r in prange(m):
        out[r] = seg_pow_sum(x[r], 0, k, ord_code, p, inv[r])
    return out


def rows_scale(src, dst, coefs, inplace):  # type: ignore[no-untyped-def]
    """dst[r, :] = src[r, :] * coefs[r]."""
    m, k = src.shape
    for r in prange(m):
        seg_scale(src[r], dst[r], 0, k, coefs[r], inplace)


def rows_clip(src, dst, ord_code, p, max_norm, eps, inplace):  # type: ignore[no-untyped-def]
    """Fused per-row norm + clip of a 2-D array: returns the norms before clipping.

    Each row is scaled right after its norm is taken, while it is still in
    cache, so the data is read from memory once instead of twice (the same
    per-row arithmetic as ``rows_pow_sum``, ``root``, ``coefficient`` and
    ``rows_scale``, so the result is bit for bit theirs).
    """
    m, k = src.shape
    out = empty_f64(m)
    for r in prange(m):
        norm = root(seg_pow_sum(src[r], 0, k, ord_code, p, 1.0), ord_code, p)
        out[r] = norm
        seg_scale(src[r], dst[r], 0, k, coefficient(norm, max_norm, eps), inplace)
    return out


def cols_pow_sum(x, ord_code, p, inv, tile):  # type: ignore[no-untyped-def]
    """Power sum of each column of a 2-D array (reduction over the first axis).

    Columns are processed in tiles so the row loop streams contiguous memory
    and vectorises; accumulation is float64 (rows can be few and wide).
    """
    k, m = x.shape
    out = np.zeros(m, np.float64)
    ntiles = (m + tile - 1) // tile
    for t in prange(ntiles):
        lo = t * tile
        hi = imin(lo + tile, m)
        if ord_code == 0:
            for j in range(lo, hi):
                out[j] = seg_pow_sum(x[:, j], 0, k, 0, p, 1.0)
            continue
        acc = out[lo:hi]
        sc = inv[lo:hi]
        for r in range(k):
            row = x[r, lo:hi]
            if ord_code == 2:
                for j in range(row.size):
                    v = abs64(widen(row[j]))
                    acc[j] += v * v
            elif ord_code == 1:
                for j in range(row.size):
                    acc[j] += abs64(widen(row[j]))
            else:
                for j in range(row.size):
                    acc[j] += (abs64(widen(row[j])) * sc[j]) ** p
    return out


def cols_scale(src, dst, coefs, inplace, tile):  # type: ignore[no-untyped-def]
    """dst[:, j] = src[:, j] * coefs[j] (in place: one array, so LLVM sees no aliasing).

    Products in float64, rounded once to the storage type (as in ``seg_scale``).
    """
    k, m = src.shape
    ntiles = (m + tile - 1) // tile
    for t in prange(ntiles):
        lo = t * tile
        hi = imin(lo + tile, m)
        c = coefs[lo:hi]
        for r in range(k):
            d = dst[r, lo:hi]
            if inplace:
                for j in range(d.size):
                    d[j] = narrow(widen(d[j]) * np.float64(c[j]), d[j])
            else:
                s = src[r, lo:hi]
                for j in range(s.size):
                    d[j] = narrow(widen(s[j]) * np.float64(c[j]), d[j])
