"""Per-sample clipping on the generic route (any Array API library): the CPU
route's rules (``_formulas``) written with ``array_api_compat`` operations
(correct, not fast)."""

from __future__ import annotations

import math
from typing import Any

import array_api_compat as aac
import numpy as np

from .._formulas import SAFE_HI, SAFE_LO, clip_coefficients, per_sample_rescaler
from .._libraries import count_dtype, wide_dtype


def clip_per_sample(
    xp: Any,
    items: list[Any],
    batch: int,
    ord_code: int,
    p: float,
    bounds: np.ndarray,
    per_layer: bool,
    reduce: str | None,
    eps: float,
) -> tuple[list[Any], Any, int]:
    wide = wide_dtype(xp)
    with np.errstate(all="ignore"):  # over/underflow is detected and rescaled below
        flat = [xp.reshape(xp.astype(x, wide), (batch, math.prod(x.shape[1:]))) for x in items]
        sums = [_row_sums(xp, g, ord_code, p, wide) for g in flat]
    any_wide = any(x.dtype == xp.float64 for x in items)
    with np.errstate(all="ignore"):
        total = xp.stack(sums)
        if not per_layer:
            total = xp.max(total, axis=0) if ord_code == 0 else xp.sum(total, axis=0)
        if ord_code == 2:
            norms = xp.sqrt(total)
        elif ord_code == 3:
            norms = total ** (1.0 / p)
        else:
            norms = total

        def rows_pow_sum(k: int, rows: np.ndarray, pc: int, pp: float, inv: np.ndarray) -> Any:
            g = xp.take(flat[k], xp.asarray(rows, device=aac.device(flat[k])), axis=0)
            g = g * xp.asarray(inv[:, None], dtype=g.dtype, device=aac.device(g))
            return np.array([float(v) for v in _row_sums(xp, g, pc, pp, g.dtype)])

        fix = per_sample_rescaler(ord_code, p, any_wide, per_layer, len(items), rows_pow_sum)
        if fix is not None:
            norms = _fixed_on_host(xp, fix, norms, total, aac.device(items[0]))
        c = xp.asarray(bounds, dtype=wide)
        c = xp.reshape(c, (len(items), 1)) if per_layer else c[0]
        one = xp.ones_like(norms)
        f = clip_coefficients(norms, c, eps, xp=xp)
        below = f < one
        if per_layer:
            below = xp.any(below, axis=0)
        clipped = int(xp.sum(xp.astype(below, count_dtype(xp))))
        outs = []
        for k, (x, g) in enumerate(zip(items, flat)):
            fk = f[k, :] if per_layer else f
            y = g * xp.reshape(fk, (batch, 1))
            if reduce is None:
                outs.append(xp.astype(xp.reshape(y, x.shape), x.dtype))
                continue
            s = xp.sum(y, axis=0)
            if reduce == "mean" and batch:  # an empty batch's mean is its zero sum
                s = s / batch
            outs.append(xp.astype(xp.reshape(s, x.shape[1:]), x.dtype))
    ndt = xp.float64 if any_wide else xp.float32
    return outs, xp.astype(norms, ndt), clipped


def _row_sums(xp: Any, g: Any, ord_code: int, p: float, wide: Any) -> Any:
    """Power sum (or max |x|) of every row of a [B, D] array, in ``wide``."""
    a = xp.abs(g)
    if g.shape[1] == 0:
        return xp.zeros((g.shape[0],), dtype=wide)
    if ord_code == 0:
        return xp.max(a, axis=1)
    if ord_code == 1:
        return xp.sum(a, axis=1)
    if ord_code == 2:
        return xp.sum(a * a, axis=1)
    return xp.sum(a**p, axis=1)


def _fixed_on_host(xp: Any, fix: Any, norms: Any, totals: Any, device: Any) -> Any:
    """``fix`` applied to the generic route's norms: one host read to test the range,
    and only when a sample is out of it, every power sum read back (small: [n, B])."""

    bad = ~((totals > SAFE_LO) & (totals < SAFE_HI))
    if not bool(xp.any(bad)):
        return norms
    shape = tuple(totals.shape)
    host_totals = np.array([float(v) for v in xp.reshape(totals, (-1,))]).reshape(shape)
    host_norms = np.array([float(v) for v in xp.reshape(norms, (-1,))]).reshape(shape)
    fix(host_norms, host_totals)
    return xp.asarray(host_norms, dtype=norms.dtype, device=device)
