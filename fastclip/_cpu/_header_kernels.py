# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Numba kernels that read NumPy array headers in bulk and check byte extents.

``numpy_headers`` reads a list's ndarray headers straight from memory (the
offsets are checked by ``_headers.check_headers`` before first use);
``extents_disjoint`` checks that the byte ranges of a table do not intersect.
Both are built lazily by ``_build.py`` like the kernels of ``_kernels.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._intrinsics import empty_i64, load_int32, load_int64


def numpy_headers(list_id, n, ndarray_type, descr, offsets, itemsize, writing):  # type: ignore[no-untyped-def]
    """Read data pointer, size and flags of a list's ndarrays straight from their C structs.

    ``list_id`` is ``id()`` of a Python list of ``n`` objects that the caller
    owns and keeps alive; its item pointers *are* the objects' ids, so no
    Python code runs per array.  Row status: 0 = exact ndarray of dtype
    ``descr``, C-contiguous, aligned, writeable; 1 = anything else (the caller
    then takes the slow, fully checked path).  ``offsets`` = (type, data, nd,
    dims, descr, flags, list items) byte offsets, checked against NumPy's and
    CPython's own answers by ``_headers.check_headers`` before first use.

    Returns ``(addrs, sizes, status, n_bad, disjoint, total)``: ``disjoint``
    is True when ``writing`` is False or no two non-empty rows share a byte
    (False: overlap, or unknown; the caller then checks in NumPy and names the
    pair), ``total`` the number of elements of all arrays.
    """
    addrs = empty_i64(n)
    sizes = empty_i64(n)
    status = np.zeros(n, np.int64)
    o_type, o_data, o_nd, o_dims, o_descr, o_flags, o_items = offsets
    items = load_int64(list_id + o_items)
    n_bad = 0
    total = 0
    for i in range(n):
        base = load_int64(items + 8 * i)
        if load_int64(base + o_type) != ndarray_type or load_int64(base + o_descr) != descr:
            status[i] = 1
            n_bad += 1
            continue
        flags = load_int32(base + o_flags)
        # C_CONTIGUOUS 0x1, ALIGNED 0x100, WRITEABLE 0x400
        if (flags & 0x501) != 0x501:
            status[i] = 1
            n_bad += 1
            continue
        nd = load_int32(base + o_nd)
        dims = load_int64(base + o_dims)
        size = 1
        for d in range(nd):
            size *= load_int64(dims + 8 * d)
        addrs[i] = load_int64(base + o_data)
        sizes[i] = size
        total += size
    disjoint = True
    if writing and n_bad == 0:
        disjoint = _disjoint(addrs, sizes, itemsize)
    return addrs, sizes, status, n_bad, disjoint, total


def extents_disjoint(addrs, sizes, itemsize):  # type: ignore[no-untyped-def]
    """``_disjoint`` for tables gathered elsewhere (torch tensors)."""
    return _disjoint(addrs, sizes, itemsize)


@njit(cache=False)
def _disjoint(addrs, sizes, itemsize):  # type: ignore[no-untyped-def]
    """True if the byte ranges of the non-empty rows provably do not intersect.

    Arrays allocated one after another come in nearly ascending address
    order, so an insertion sort of (start, end) by start costs about one pass;
    it gives up (False: unknown, the caller sorts in NumPy) after ~8 moves per
    row, so an unlucky order never costs O(n**2).  Sorted, the ranges are
    disjoint iff each starts at or after the end of the one before.
    """
    m = 0
    for i in range(sizes.size):
        if sizes[i] != 0:
            m += 1
    starts = empty_i64(m)
    ends = empty_i64(m)
    budget = 8 * m + 64
    k = 0
    for i in range(sizes.size):
        if sizes[i] == 0:
            continue
        s = addrs[i]
        e = s + sizes[i] * itemsize
        j = k
        while j > 0 and starts[j - 1] > s:
            starts[j] = starts[j - 1]
            ends[j] = ends[j - 1]
            j -= 1
        budget -= k - j
        if budget < 0:
            return False
        starts[j] = s
        ends[j] = e
        k += 1
    for j in range(1, m):
        if starts[j] < ends[j - 1]:
            return False
    return True
