# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Numba kernels for per-sample clipping (DP-SGD), built lazily by ``_build.py``.

Pass 1 (per-sample power sums) reuses ``_kernels.rows_pow_sum`` on a
contiguous ``[B, D]`` view.  Pass 2 lives here: ``weighted_sum`` computes
``out[d] = scale * sum_b f[b] * x[b, d]`` straight into the B-times-smaller
output, so the clipped per-sample copies are never materialised.

Each parallel work item owns a tile of ``tile`` columns and streams every
row's slice of it; rows are added in the storage's accumulation type (float32
for 32- and 16-bit data) inside blocks of ``rblock`` rows, and block sums are
combined in float64, as in ``_kernels.py`` (its ``BLOCK`` has the measurement).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._elements import acc_zero, coef_like, narrow, widen
from ._intrinsics import imin


def weighted_sum(x, f, out, scale, tile, rblock):  # type: ignore[no-untyped-def]
    """out[d] = narrow(scale * sum_b f[b] * x[b, d]) for a C-contiguous 2-D ``x`` (B >= 1)."""
    nrows, ncols = x.shape
    ntiles = (ncols + tile - 1) // tile
    for t in prange(ntiles):
        lo = t * tile
        hi = imin(lo + tile, ncols)
        o = out[lo:hi]
        acc64 = np.zeros(hi - lo, np.float64)
        acc = np.full(hi - lo, acc_zero(x[0, lo]))
        for b0 in range(0, nrows, rblock):
            b1 = imin(b0 + rblock, nrows)
            for j in range(acc.size):
                acc[j] = 0
            b = b0
            while b + 4 <= b1:  # four rows per sweep: a quarter of the accumulator traffic
                r0 = x[b, lo:hi]
                r1 = x[b + 1, lo:hi]
                r2 = x[b + 2, lo:hi]
                r3 = x[b + 3, lo:hi]
                c0 = coef_like(f[b], r0[0])
                c1 = coef_like(f[b + 1], r0[0])
                c2 = coef_like(f[b + 2], r0[0])
                c3 = coef_like(f[b + 3], r0[0])
                for j in range(r0.size):
                    acc[j] += (widen(r0[j]) * c0 + widen(r1[j]) * c1) + (
                        widen(r2[j]) * c2 + widen(r3[j]) * c3
                    )
                b += 4
            for bb in range(b, b1):
                row = x[bb, lo:hi]
                c = coef_like(f[bb], row[0])
                for j in range(row.size):
                    acc[j] += widen(row[j]) * c
            for j in range(acc.size):
                acc64[j] += acc[j]
        for j in range(o.size):
            o[j] = narrow(acc64[j] * scale, o[j])
