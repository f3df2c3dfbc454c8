"""Per-array norms from the global-norm pass: ``per_array=True`` and the
non-finite diagnosis (which arrays make a total norm NaN or inf).

The kernels (``_per_array_kernels``) return each array's power sum beside
the total from the same launch per dtype; this module maps table rows back to
the caller's positions (``Table.index``) and applies ``robust_norm``'s
rescaling where a power sum left float64's safe range (each such array, and
the total, recomputed alone: extra passes only for data near 1e+-140 in
float64 L2, or ``p`` other than 1, 2 and inf).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _config as cfg
from .._formulas import SAFE_HI, SAFE_LO, needs_rescale, robust_norm, root
from ._adapters import norm_dtype
from ._build import jit_pair
from ._launch import run, run_with
from ._pack import Packed, Table
from ._per_array_kernels import tab_clip_sums, tab_pow_sums

__all__ = ["clip_with_norms", "nonfinite_indices", "norms"]


def _positions(t: Table) -> Any:
    return slice(None) if t.index is None else t.index


def _row_norm(t: Table, k: int, ord_code: int, p: float) -> float:
    """Row ``k``'s norm alone, rescaled if its power sum under/overflows."""
    addrs, sizes = t.addrs[k : k + 1], t.sizes[k : k + 1]

    def pow_sum(pc: int, pp: float, inv: float) -> float:
        args = (addrs, sizes, t.like, pc, pp, inv, cfg.CHUNK)
        return float(run("tab_pow_sum", int(sizes[0]), *args))

    return robust_norm(pow_sum, ord_code, p, norm_dtype(t.like.dtype) == np.float64)


def _rooted(t: Table, sums: np.ndarray, ord_code: int, p: float) -> np.ndarray:
    """Norms of one table's rows from their power sums (float64)."""
    values = np.asarray(root(sums, ord_code, p), np.float64)
    if needs_rescale(ord_code, norm_dtype(t.like.dtype) == np.float64):
        with np.errstate(invalid="ignore"):
            for k in np.flatnonzero(~((sums > SAFE_LO) & (sums < SAFE_HI))):
                values[k] = _row_norm(t, int(k), ord_code, p)
    return values


def _combine(total: float, s: float, ord_code: int) -> float:
    """``Packed.total_pow_sum``'s combination of two tables' results."""
    if ord_code != 0:
        return total + s
    if s != s or total != total:
        return math.nan
    return s if s > total else total


def norms(packed: Packed, n: int, ord_code: int, p: float) -> tuple[float, np.ndarray]:
    """(total norm, float64 norms of the ``n`` arrays in the caller's order), one
    launch per dtype; the total is the one ``Packed.norm`` gives."""
    per = np.empty(n, np.float64)
    total = 0.0
    for t in packed.tables:
        sums = np.empty(t.sizes.size, np.float64)
        args = (t.addrs, t.sizes, t.like, ord_code, p, 1.0, cfg.CHUNK, sums)
        total = _combine(total, float(run_with(jit_pair(tab_pow_sums), t.n, *args)), ord_code)
        per[_positions(t)] = _rooted(t, sums, ord_code, p)
    wide = packed.dtype == np.float64
    if needs_rescale(ord_code, wide) and not SAFE_LO < total < SAFE_HI:
        return packed.norm(ord_code, p), per  # rescaled: more passes, out of range only
    return float(root(total, ord_code, p)), per


def clip_with_norms(
    t: Table, ord_code: int, p: float, max_norm: float, eps: float
) -> tuple[float, np.ndarray]:
    """The fused in-place clip of one table (``tab_clip``) with the rows' norms before
    clipping; only for sums that cannot leave the safe range (``needs_rescale`` false)."""
    sums = np.empty(t.sizes.size, np.float64)
    args = (t.addrs, t.sizes, t.like, ord_code, p, max_norm, eps, cfg.CHUNK, sums)
    value = float(run_with(jit_pair(tab_clip_sums), t.n, *args))
    return value, np.asarray(root(sums, ord_code, p), np.float64)


def nonfinite_indices(per: np.ndarray) -> tuple[int, ...]:
    """Positions of the non-finite norms."""
    return tuple(int(i) for i in np.flatnonzero(~np.isfinite(per)))
