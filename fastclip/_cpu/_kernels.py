# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Numba CPU kernels of one array (``arr_*``) and of tables of arrays (``tab_*``).

Tiny scalar loops over the segment primitives of ``_segments``, no validation
(``_core`` and ``_pack`` validate).  Kernels come in two flavours built from
the same Python source by ``_build.py``: serial and ``parallel=True`` (a
``prange`` over chunks of ``chunk`` elements).  Multi-array kernels take a
table of raw addresses and sizes, so N arrays cost one launch (apex
``multi_tensor_apply`` in spirit).

This is the first module ``_build.kernel`` searches by name, so it also
re-exports the per-row and per-column kernels of ``_axis_kernels`` and the
primitives other kernel modules import from here.
"""

from __future__ import annotations

import numpy as np
from numba import carray, prange

from .._formulas import SAFE_HI, SAFE_LO
from ._axis_kernels import (
    cols_pow_sum,
    cols_scale,
    rows_clip,
    rows_clip_wide,
    rows_pow_sum,
    rows_scale,
    rows_scale_at,
)
from ._intrinsics import address_as_pointer, empty_f64, imin
from ._segments import (
    BLOCK,
    FASTMATH,
    INNER,
    chunk_starts,
    coefficient,
    coefficient_parts64,
    combine,
    normal_in_type,
    pow2_inverse64,
    root,
    seg_clamp,
    seg_pow_sum,
    seg_scale,
    table_row,
)

__all__ = [
    "BLOCK",
    "FASTMATH",
    "INNER",
    "arr_clamp",
    "arr_clip",
    "arr_clip_wide",
    "arr_pow_sum",
    "arr_scale",
    "chunk_starts",
    "coefficient",
    "cols_pow_sum",
    "cols_scale",
    "combine",
    "normal_in_type",
    "root",
    "rows_clip",
    "rows_clip_wide",
    "rows_pow_sum",
    "rows_scale",
    "rows_scale_at",
    "seg_clamp",
    "seg_pow_sum",
    "seg_scale",
    "tab_clamp",
    "tab_clip",
    "tab_clip_wide",
    "tab_pow_sum",
    "tab_scale",
    "table_row",
]


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


# ------------------------------------------- float64, fused with two factors


def arr_clip_wide(src, dst, ord_code, p, max_norm, eps, inplace, chunk):  # type: ignore[no-untyped-def]
    """``arr_clip`` for float64 data, ord_code 0-2: (norm, sum, inv).

    The arithmetic of ``_core``'s two launches (``robust_norm`` over
    ``arr_pow_sum``, ``coefficient_parts``, ``arr_scale``): an L2 power sum
    outside (SAFE_LO, SAFE_HI) with a finite nonzero max |x| is taken again
    scaled by ``inv = pow2_inverse(max)`` and returned unscaled as (norm, sum,
    inv) for the caller to finish with NumPy's power (as ``rows_clip_wide``);
    otherwise the data are scaled by the two-factor coefficient here and
    ``inv`` is 0.
    """
    n = src.size
    nchunks = (n + chunk - 1) // chunk
    partials = empty_f64(nchunks)
    for c in prange(nchunks):
        lo = c * chunk
        partials[c] = seg_pow_sum(src, lo, imin(lo + chunk, n), ord_code, p, 1.0)
    total = combine(partials, ord_code)
    norm = root(total, ord_code, p)
    if ord_code == 2 and not (total > SAFE_LO and total < SAFE_HI):
        for c in prange(nchunks):
            lo = c * chunk
            partials[c] = seg_pow_sum(src, lo, imin(lo + chunk, n), 0, p, 1.0)
        top = combine(partials, 0)
        if top > 0.0 and top < np.inf:
            inv = pow2_inverse64(top)
            for c in prange(nchunks):
                lo = c * chunk
                partials[c] = seg_pow_sum(src, lo, imin(lo + chunk, n), 3, p, inv)
            return norm, combine(partials, 3), inv
    coef, coef2 = coefficient_parts64(norm, max_norm, eps)
    for c in prange(nchunks):
        lo = c * chunk
        seg_scale(src, dst, lo, imin(lo + chunk, n), coef, inplace)
    if coef2 != 1.0:  # a second pass, as the two launches' second arr_scale
        for c in prange(nchunks):
            lo = c * chunk
            seg_scale(dst, dst, lo, imin(lo + chunk, n), coef2, True)
    return norm, 0.0, 0.0


def tab_clip_wide(addrs, sizes, like, ord_code, p, max_norm, eps, chunk):  # type: ignore[no-untyped-def]
    """``tab_clip`` of one float64 table, in place: (norm, sum, inv) as ``arr_clip_wide``
    (the two launches: ``Packed.norm`` of one table, ``coefficient_parts``,
    ``Packed.scale``)."""
    starts = chunk_starts(sizes, chunk)
    nchunks = starts[-1]
    partials = empty_f64(nchunks)
    for c in prange(nchunks):
        t = table_row(starts, c)
        a = carray(address_as_pointer(addrs[t], like), sizes[t])
        lo = (c - starts[t]) * chunk
        partials[c] = seg_pow_sum(a, lo, imin(lo + chunk, sizes[t]), ord_code, p, 1.0)
    total = combine(partials, ord_code)
    norm = root(total, ord_code, p)
    if ord_code == 2 and not (total > SAFE_LO and total < SAFE_HI):
        for c in prange(nchunks):
            t = table_row(starts, c)
            a = carray(address_as_pointer(addrs[t], like), sizes[t])
            lo = (c - starts[t]) * chunk
            partials[c] = seg_pow_sum(a, lo, imin(lo + chunk, sizes[t]), 0, p, 1.0)
        top = combine(partials, 0)
        if top > 0.0 and top < np.inf:
            inv = pow2_inverse64(top)
            for c in prange(nchunks):
                t = table_row(starts, c)
                a = carray(address_as_pointer(addrs[t], like), sizes[t])
                lo = (c - starts[t]) * chunk
                partials[c] = seg_pow_sum(a, lo, imin(lo + chunk, sizes[t]), 3, p, inv)
            return norm, combine(partials, 3), inv
    coef, coef2 = coefficient_parts64(norm, max_norm, eps)
    for c in prange(nchunks):
        t = table_row(starts, c)
        a = carray(address_as_pointer(addrs[t], like), sizes[t])
        lo = (c - starts[t]) * chunk
        seg_scale(a, a, lo, imin(lo + chunk, sizes[t]), coef, True)
    if coef2 != 1.0:
        for c in prange(nchunks):
            t = table_row(starts, c)
            a = carray(address_as_pointer(addrs[t], like), sizes[t])
            lo = (c - starts[t]) * chunk
            seg_scale(a, a, lo, imin(lo + chunk, sizes[t]), coef2, True)
    return norm, 0.0, 0.0
