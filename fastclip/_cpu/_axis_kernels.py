# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Numba CPU kernels along an axis of one 2-D array: ``rows_*`` reduce (and scale)
each row of a ``[m, k]`` view, ``cols_*`` each column of a ``[k, m]`` view.

``_axes.AxisPlan`` picks the view and launches these by name (through
``_kernels``, which re-exports them for ``_build.kernel``).  Built from the
segment primitives of ``_segments``; a ``prange`` over rows (or column tiles)
in the parallel twin.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._elements import abs64, narrow, widen
from ._intrinsics import empty_f64, imin
from ._segments import coefficient, root, seg_pow_sum, seg_scale


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
