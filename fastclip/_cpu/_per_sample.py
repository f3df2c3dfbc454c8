"""Per-sample clipping on the CPU route (NumPy arrays, torch CPU tensors).

Pass 1 reads every per-sample gradient once for its per-sample power sums
(``rows_pow_sum``); pass 2 reads it again and writes only the batch reduction
(``out[d] = sum_b f_b g[b, d]``, the fused weighted-sum kernel), never the
clipped per-sample copies.  Norms and factors follow ``_formulas``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from .. import _config as cfg
from .._formulas import per_sample_norms_and_factors, per_sample_rescaler
from ._adapters import float_storage, norm_dtype
from ._launch import run


def check_cpu_items(lib: Any, items: list[Any]) -> None:
    if lib.name == "torch":
        for x in items:
            if x.device.type != "cpu":
                raise TypeError(
                    f"all tensors in one call must be on one device, got cpu and {x.device}"
                )


def _new(lib: Any, like: Any, shape: tuple[int, ...]) -> Any:
    if lib.name == "torch":
        return sys.modules["torch"].empty(shape, dtype=like.dtype)
    return np.empty(shape, like.dtype)


def clip_per_sample(
    lib: Any,
    items: list[Any],
    batch: int,
    ord_code: int,
    p: float,
    bounds: np.ndarray,
    per_layer: bool,
    reduce: str | None,
    eps: float,
) -> tuple[list[Any], Any, int]:
    check_cpu_items(lib, items)
    views = []
    for x in items:
        sv = float_storage(lib, x, "clip_per_sample")
        width = math.prod(sv.shape[1:])
        views.append(np.ascontiguousarray(sv).reshape(batch, width))  # copies only if strided
    ones = np.ones(batch)
    sums = np.zeros((len(views), batch))
    for k, x2 in enumerate(views):
        if batch:  # an empty batch (Poisson sampling) has no rows to read
            sums[k] = run("rows_pow_sum", x2.size, x2, ord_code, p, ones)
    wide = any(norm_dtype(v.dtype) == np.float64 for v in views)

    def rows_pow_sum(k: int, rows: np.ndarray, pc: int, pp: float, inv: np.ndarray) -> Any:
        x2 = views[k]
        if rows.size == 1:
            x2 = x2[rows[0] : rows[0] + 1]
        elif rows.size != x2.shape[0]:  # all rows: no copy
            x2 = x2[rows]
        return run("rows_pow_sum", x2.size, x2, pc, pp, inv)

    fix = per_sample_rescaler(ord_code, p, wide, per_layer, len(views), rows_pow_sum)
    norms, factors, clipped = per_sample_norms_and_factors(
        sums, ord_code, p, bounds, per_layer, eps, fix
    )
    outs = []
    # The mean of an empty batch is its (zero) sum: see clip_per_sample's Notes.
    scale = 1.0 / batch if reduce == "mean" and batch else 1.0
    for k, (x, x2) in enumerate(zip(items, views)):
        f = np.ascontiguousarray(factors[k])
        if reduce is None:
            out = _new(lib, x, tuple(x.shape))
            dst = lib.storage(out).reshape(x2.shape)
            if x2.size:
                run("rows_scale", x2.size, x2, dst, f, False)
        else:
            out = _new(lib, x, tuple(x.shape[1:]))
            dst = lib.storage(out).reshape(-1)
            if x2.size:
                _weighted_sum(x2, f, dst, scale, wide)
            elif dst.size:  # no rows (B == 0): the empty sum is 0
                dst[...] = 0
        outs.append(out)
    ndt = np.dtype(np.float64 if wide else np.float32)
    return outs, lib.wrap(norms, ndt, items[0]), clipped


def _run_weighted_sum(x2: np.ndarray, f: np.ndarray, dst: np.ndarray, scale: float) -> None:
    args = (x2, f, dst, scale, cfg.PER_SAMPLE_COL_TILE, cfg.PER_SAMPLE_ROW_BLOCK)
    run("weighted_sum", x2.size, *args)


def _weighted_sum(x2: np.ndarray, f: np.ndarray, dst: np.ndarray, scale: float, wide: bool) -> None:
    """dst = scale * sum_b f[b] * x2[b], rounded once into dst's dtype.

    One launch, unless some factors of 16/32-bit rows are still below float32's
    normal range after ``_factors_in_range`` (a factor of 5e-46 beside one of
    5e-3: samples of norm 1e20 and 1e-23 clipped to 1e-25), which the kernel's
    float32 factor would flush to 0 or round to a subnormal and drop those rows
    from the sum.  Then the rows are summed in groups, each group's factors
    rescaled by its own largest, into float64 partial sums, added in float64 and
    rounded once (``_grouped_sums``; a rare path, and the rows it sums are
    copied).
    """
    g, out_scale = _factors_in_range(f, scale, wide)
    if wide or not _loses_digits(g):
        _run_weighted_sum(x2, g, dst, out_scale)
        return
    total = np.sum(_grouped_sums(x2, f, scale), axis=0)
    _run_weighted_sum(total.reshape(1, -1), np.ones(1), dst, 1.0)  # one rounding into dst


def _loses_digits(f: np.ndarray) -> bool:
    """Whether a positive factor lies below float32's smallest normal."""
    return bool(np.any((f > 0.0) & (f < _F32_NORMAL_MIN)))


_F32_NORMAL_MIN = float(np.finfo(np.float32).tiny)


def _grouped_sums(x2: np.ndarray, f: np.ndarray, scale: float) -> list[np.ndarray]:
    """float64 partial sums of ``scale * f[b] * x2[b]`` over groups of rows whose
    factors each fit float32 once rescaled by their group's largest."""
    g, out_scale = _factors_in_range(f, scale, False)
    small = (g > 0.0) & (g < _F32_NORMAL_MIN)
    if not small.any():
        part = np.empty(x2.shape[1], np.float64)
        _run_weighted_sum(x2, g, part, out_scale)
        return [part]
    parts = _grouped_sums(x2[small], f[small], scale)  # rescaled by their own largest
    if not small.all():
        parts += _grouped_sums(x2[~small], f[~small], scale)
    return parts


def _factors_in_range(f: np.ndarray, scale: float, wide: bool) -> tuple[np.ndarray, float]:
    """Factors the weighted sum can take in float32, and the float64 output scale.

    The weighted sum multiplies 32- and 16-bit rows by float32 factors; a factor
    below float32's normal range (samples of norm 1e30 clipped to 1e-30: 1e-60)
    would flush to 0 although every product is representable.  Dividing the
    factors by a power of two near their largest, and multiplying the output's
    float64 scale by it, is exact and keeps the largest factors in range.
    """
    if wide or not f.size:
        return f, scale
    top = float(np.max(f))
    if not (0.0 < top < 2.0**-60):  # in range already (or 0, NaN, inf: nothing to gain)
        return f, scale
    _, e = np.frexp(top)
    return np.ldexp(f, -e), scale * math.ldexp(1.0, int(e))
