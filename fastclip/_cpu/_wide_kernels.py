# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Power sums with every element accumulated in float64, for norms that must not
depend on how the data is split.

``_kernels.tab_pow_sum`` sums float32 and 16-bit elements in float32 blocks of
``BLOCK`` elements: fast, and accurate to ~2e-10 relative, but which elements
share a block depends on the arrays' sizes, so a model split 2 ways and 4 ways
(``fastclip.distributed``) gave norms differing by more than one float32
rounding.  Here each element is widened to float64 before it is added (L1, L2;
other p and max were float64 already), so the total of any split is the same up
to float64 rounding and its float32 result is the float64 value rounded once.
Built lazily by ``_build.py`` like the kernels of ``_kernels.py``.
"""

from __future__ import annotations

from numba import carray, njit, prange

from ._elements import abs2_64, abs64, widen
from ._intrinsics import address_as_pointer, empty_f64, imin
from ._kernels import FASTMATH, INNER, chunk_starts, combine, seg_pow_sum, table_row


@njit(error_model="numpy", fastmath=FASTMATH, cache=False, **INNER)
def seg_pow_sum_wide(a, lo, hi, ord_code, p, inv):  # type: ignore[no-untyped-def]
    """``seg_pow_sum`` of a[lo:hi] with float64 accumulation of every element."""
    if ord_code != 1 and ord_code != 2:
        return seg_pow_sum(a, lo, hi, ord_code, p, inv)  # max, other p: float64 already
    if hi <= lo:
        return 0.0
    seg = a[lo:hi]
    total = 0.0
    if ord_code == 2:
        for i in range(seg.size):
            total += abs2_64(widen(seg[i]))
    else:
        for i in range(seg.size):
            total += abs64(widen(seg[i]))
    return total


def tab_pow_sum_wide(addrs, sizes, like, ord_code, p, inv, chunk):  # type: ignore[no-untyped-def]
    """``tab_pow_sum`` with float64 accumulation of every element."""
    starts = chunk_starts(sizes, chunk)
    nchunks = starts[-1]
    partials = empty_f64(nchunks)
    for c in prange(nchunks):
        t = table_row(starts, c)
        a = carray(address_as_pointer(addrs[t], like), sizes[t])
        lo = (c - starts[t]) * chunk
        partials[c] = seg_pow_sum_wide(a, lo, imin(lo + chunk, sizes[t]), ord_code, p, inv)
    return combine(partials, ord_code)
