# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Numba kernels that also return each array's power sum, from the same pass.

Twins of ``_kernels.tab_pow_sum`` / ``tab_clip`` (``global_norm(...,
per_array=True)``, ``clip_by_global_norm_(..., per_array=True)`` and the
non-finite diagnosis): the parallel loop over chunks is the same, and the
per-chunk partials that it already writes are combined twice, once over all
chunks (the total, exactly as the plain kernels compute it, so the total is
bit-identical with and without ``per_array``) and once per array (chunks of
array ``t`` are ``starts[t]:starts[t + 1]``).  The second combination is a
serial loop over the partials, one per ``chunk`` elements: no second read of
the data.  Kept apart from ``_kernels`` so that the plain kernels (and their
compiled cache entries) are untouched.
"""

from __future__ import annotations

from numba import carray, prange

from ._intrinsics import address_as_pointer, empty_f64, imin
from ._kernels import (
    chunk_starts,
    coefficient,
    combine,
    root,
    seg_pow_sum,
    seg_scale,
    table_row,
)


def tab_pow_sums(addrs, sizes, like, ord_code, p, inv, chunk, out):  # type: ignore[no-untyped-def]
    """``tab_pow_sum`` that also writes the power sum of array t into ``out[t]``."""
    starts = chunk_starts(sizes, chunk)
    nchunks = starts[-1]
    partials = empty_f64(nchunks)
    for c in prange(nchunks):
        t = table_row(starts, c)
        a = carray(address_as_pointer(addrs[t], like), sizes[t])
        lo = (c - starts[t]) * chunk
        partials[c] = seg_pow_sum(a, lo, imin(lo + chunk, sizes[t]), ord_code, p, inv)
    for t in range(sizes.size):
        out[t] = combine(partials[starts[t] : starts[t + 1]], ord_code)  # 0 for no chunks
    return combine(partials, ord_code)


def tab_clip_sums(addrs, sizes, like, ord_code, p, max_norm, eps, chunk, out):  # type: ignore[no-untyped-def]
    """``tab_clip`` (fused norm and in-place clip) that also writes each array's
    power sum (before clipping) into ``out``; returns the norm."""
    starts = chunk_starts(sizes, chunk)
    nchunks = starts[-1]
    partials = empty_f64(nchunks)
    for c in prange(nchunks):
        t = table_row(starts, c)
        a = carray(address_as_pointer(addrs[t], like), sizes[t])
        lo = (c - starts[t]) * chunk
        partials[c] = seg_pow_sum(a, lo, imin(lo + chunk, sizes[t]), ord_code, p, 1.0)
    for t in range(sizes.size):
        out[t] = combine(partials[starts[t] : starts[t + 1]], ord_code)
    norm = root(combine(partials, ord_code), ord_code, p)
    coef = coefficient(norm, max_norm, eps)
    for c in prange(nchunks):
        t = table_row(starts, c)
        a = carray(address_as_pointer(addrs[t], like), sizes[t])
        lo = (c - starts[t]) * chunk
        seg_scale(a, a, lo, imin(lo + chunk, sizes[t]), coef, True)
    return norm
