"""float64 NumPy oracles for every fastclip operation.

Written straight from the papers' and peers' formulas, independent of fastclip:
all arithmetic in float64 (complex values enter through ``|z|``), NaN and inf
propagating as IEEE arithmetic makes them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _abs64(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind == "c":
        return np.abs(a.astype(np.complex128))
    return np.abs(a.astype(np.float64))


def norm(x: Any, ord: float = 2, axis: Any = None, keepdims: bool = False) -> np.ndarray:
    """Vector p-norm over ``axis`` (the reduction axes; None = all elements)."""
    a = _abs64(x)
    p = float(ord)
    if math.isinf(p):
        # initial=0 makes empty reductions 0 (norm of nothing); NaN still wins.
        return np.max(a, axis=axis, keepdims=keepdims, initial=0.0)
    if p == 1:
        return np.sum(a, axis=axis, keepdims=keepdims)
    # ||x||_p = m * ||x / m||_p with m = max |x|: the textbook way to keep |x|**p
    # from under- or overflowing float64 (e.g. |x| ~ 1e-105 with p = 3).
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(a, axis=axis, keepdims=True, initial=0.0)
        ok = (m > 0) & np.isfinite(m)
        scale = np.where(ok, m, 1.0)
        total = np.sum((a / scale) ** p, axis=axis, keepdims=True) ** (1.0 / p) * scale
        naive = np.sum(a**p, axis=axis, keepdims=True) ** (1.0 / p)
        out = np.where(ok, total, naive)
    return out if keepdims else np.squeeze(out, axis=axis if axis is not None else None)


def global_norm(arrays: list[Any], ord: float = 2) -> np.ndarray:
    """p-norm of all elements of all arrays together (0.0 for none)."""
    flat = [_abs64(a).reshape(-1) for a in arrays]
    return norm(np.concatenate(flat) if flat else np.zeros(0), ord)


def coefficient(n: Any, max_norm: float, eps: float) -> np.ndarray:
    """min(1, max_norm / (n + eps)), NaN propagating; 1 where n + eps == 0 (a zero
    norm with eps = 0: nothing to clip, rather than 0 / 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        den = np.asarray(n, np.float64) + eps
        return np.where(den == 0.0, 1.0, np.minimum(1.0, max_norm / den))


def _as64(x: Any) -> np.ndarray:
    a = np.asarray(x)
    return a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)


# Long double where its exponent range is wider than float64's (x86's 80-bit: up to
# 1e4932), so that a coefficient below float64's range (data of norm 1e300
# clipped to 1e-300: 1e-600) does not flush to 0 before the product is formed.
_WIDE = np.longdouble if np.finfo(np.longdouble).maxexp > 1024 else np.float64


def _times_coefficient(x: Any, n: Any, max_norm: float, eps: float) -> np.ndarray:
    """x * min(1, c / (n + eps)) with the zero-norm rule, the coefficient and the product
    in ``_WIDE``, rounded once to float64 (complex128)."""
    a = _as64(x)
    if _WIDE is np.float64:
        product_dtype: Any = a.dtype
    else:
        product_dtype = np.clongdouble if a.dtype.kind == "c" else np.longdouble
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        den = np.asarray(n, np.float64).astype(_WIDE) + _WIDE(eps)
        coef = np.where(den == 0.0, 1.0, np.minimum(1.0, _WIDE(max_norm) / den))
        return (a.astype(product_dtype) * coef).astype(a.dtype)


def clip_by_norm(x: Any, max_norm: float, ord: float = 2, axis: Any = None, eps: float = 1e-6):
    """x * min(1, c / (||x|| + eps)), the norm over ``axis`` (per kept slice)."""
    n = norm(x, ord, axis=axis, keepdims=True)
    return _times_coefficient(x, n, max_norm, eps)


def normalize(x: Any, ord: float = 2, axis: Any = None, eps: float = 1e-6) -> np.ndarray:
    """x / (||x|| + eps)."""
    n = norm(x, ord, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _as64(x) / (n + eps)


def clip_by_global_norm(
    arrays: list[Any], max_norm: float, ord: float = 2, eps: float = 1e-6, total_norm: Any = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Every array times min(1, c / (global norm + eps)); returns (arrays, norm before)."""
    total = global_norm(arrays, ord) if total_norm is None else np.float64(total_norm)
    return [_times_coefficient(a, total, max_norm, eps) for a in arrays], total


def clip_by_value(x: Any, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Clamp to [lo, hi]; NaN stays NaN.

    Integer and bool data (bools as the integers 0 and 1) are clamped to the
    bounds rounded inward, ``ceil(lo)`` and ``floor(hi)``, and stay in their
    dtype's range (huge and infinite bounds saturate at it).
    """
    a = np.asarray(x)
    if a.dtype.kind in "biu":
        info = np.iinfo(a.dtype) if a.dtype.kind != "b" else None
        low, high = (0, 1) if info is None else (int(info.min), int(info.max))

        def bound(b: float, lower: bool) -> int:
            if math.isinf(b):  # clips everything to +-inf, which saturates at the range
                return high + 1 if b > 0 else low - 1
            return math.ceil(b) if lower else math.floor(b)

        v = [int(e) for e in a.reshape(-1)]  # Python ints: no overflow
        if lo is not None:
            v = [max(e, bound(lo, True)) for e in v]
        if hi is not None:
            v = [min(e, bound(hi, False)) for e in v]
        v = [min(max(e, low), high) for e in v]  # results stay in the dtype's range
        return np.array(v, dtype=a.dtype).reshape(a.shape)
    v = a.astype(np.float64)
    if lo is not None:
        v = np.where(v < lo, lo, v)
    if hi is not None:
        v = np.where(v > hi, hi, v)
    return v


def clip_per_sample(
    arrays: list[Any],
    max_norm: Any,
    ord: float = 2,
    per_layer: bool = False,
    reduce: str | None = "sum",
    eps: float = 1e-6,
) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Per-sample clipping (DP-SGD): ``(outputs, norms, n_clipped)``.

    Sample ``b``'s norm is taken over all arrays' ``[b]`` slices together (or
    per array with ``per_layer``); its factor is ``min(1, C / (n_b + eps))``,
    1 for a zero norm; outputs are the scaled slices, summed or averaged over
    the batch (``reduce``).  ``max_norm``: one bound, or one per array.
    """
    g = [np.asarray(a, np.float64) for a in arrays]
    b = g[0].shape[0]
    flat = [np.abs(x.reshape(b, -1)) for x in g]
    with np.errstate(all="ignore"):
        if ord == math.inf:
            sums = np.array([x.max(axis=1) if x.shape[1] else np.zeros(b) for x in flat])
        else:
            sums = np.array([(x**ord).sum(axis=1) for x in flat])
        bounds = np.broadcast_to(np.asarray(max_norm, np.float64), (len(g),))
        if per_layer:
            norms = sums if ord == math.inf else sums ** (1 / ord)
            f = np.where(norms + eps == 0, 1.0, np.minimum(1.0, bounds[:, None] / (norms + eps)))
            clipped = int((f < 1).any(axis=0).sum())
        else:
            tot = sums.max(axis=0) if ord == math.inf else sums.sum(axis=0)
            norms = tot if ord == math.inf else tot ** (1 / ord)
            f1 = np.where(norms + eps == 0, 1.0, np.minimum(1.0, bounds[0] / (norms + eps)))
            clipped = int((f1 < 1).sum())
            f = np.broadcast_to(f1, (len(g), b))
        outs = []
        for k, x in enumerate(g):
            y = x * f[k].reshape((b,) + (1,) * (x.ndim - 1))
            if reduce == "sum":
                y = y.sum(axis=0)
            elif reduce == "mean":
                y = y.mean(axis=0)
            outs.append(y)
    return outs, norms, clipped


def adamw_step(p, g, m, v, vmax, step, lr, b1, b2, eps, wd, coef):  # type: ignore[no-untyped-def]
    """torch.optim.AdamW's formulas in float64 (returns new p, m, v, vmax)."""
    g = g * coef
    p = p * (1 - lr * wd)
    m = m + (1 - b1) * (g - m)
    v = b2 * v + (1 - b2) * g * g
    if vmax is not None:
        vmax = np.maximum(vmax, v)
    den = np.sqrt(v if vmax is None else vmax) / math.sqrt(1 - b2**step) + eps
    return p - lr / (1 - b1**step) * m / den, m, v, vmax


def sgd_step(p, g, buf, lr, mom, damp, wd, nesterov, first, coef):  # type: ignore[no-untyped-def]
    """torch.optim.SGD's formulas in float64 (returns new p, momentum buffer)."""
    g = g * coef + wd * p
    if mom:
        buf = g.copy() if first else mom * buf + (1 - damp) * g
        g = g + mom * buf if nesterov else buf
    return p - lr * g, buf


# ------------------------------------------------ fastclip.adaptive's papers


def percentile(history: list[float], p: float) -> float:
    """AutoClip's threshold: the ``p``-th percentile of the norm history (NumPy's linear rule)."""
    with np.errstate(invalid="ignore"):
        return float(np.percentile(np.asarray(history, np.float64), p))


class ZClipReference:
    """Transcription of bluorion-com/ZClip ``zclip.py`` (float64, on plain norms).

    Returns the clip threshold used at each step (None = untouched).
    """

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=None, eps=1e-6, warmup_steps=25,
                 mode="zscore", clip_option="adaptive_scaling", clip_factor=1.0,
                 skip_update_on_spike=False):  # fmt: skip
        self.alpha, self.z_thresh, self.max_grad_norm = alpha, z_thresh, max_grad_norm
        self.eps, self.warmup_steps, self.mode = eps, warmup_steps, mode
        self.clip_option, self.clip_factor = clip_option, clip_factor
        self.skip_update_on_spike = skip_update_on_spike
        self.buffer: list[float] = []
        self.initialized = False
        self.mean = self.var = None

    def _initialize_ema(self):
        self.mean = sum(self.buffer) / len(self.buffer)
        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
        self.initialized = True
        self.buffer = []

    def _update_ema(self, grad_norm):
        self.mean = self.alpha * self.mean + (1 - self.alpha) * grad_norm
        self.var = self.alpha * self.var + (1 - self.alpha) * (grad_norm - self.mean) ** 2

    def _compute_clip_val(self, grad_norm):
        std = self.var**0.5
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            if grad_norm > threshold:
                return threshold
        else:
            z = (grad_norm - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    eta = z / self.z_thresh
                    threshold = self.mean + (self.z_thresh * std) / eta
                    return threshold * self.clip_factor
                return self.mean
        return None

    def step(self, total_norm):
        if not self.initialized:
            self.buffer.append(total_norm)
            if len(self.buffer) >= self.warmup_steps:
                self._initialize_ema()
            return self.max_grad_norm
        clip_val = self._compute_clip_val(total_norm)
        used = clip_val
        if self.max_grad_norm is not None:
            used = self.max_grad_norm if clip_val is None else min(clip_val, self.max_grad_norm)
        if not (clip_val is not None and self.skip_update_on_spike):
            self._update_ema(clip_val if clip_val is not None else total_norm)
        return used


def timm_agc(p: np.ndarray, g: np.ndarray, clip: float, eps: float) -> np.ndarray:
    """timm ``adaptive_clip_grad`` (norm_type 2) in float64 NumPy."""

    def unitwise(x):
        if x.ndim <= 1:
            return np.sqrt(np.sum(x * x))
        return np.sqrt(np.sum(x * x, axis=tuple(range(1, x.ndim)), keepdims=True))

    max_norm = np.maximum(unitwise(p), eps) * clip
    gn = unitwise(g)
    clipped = g * (max_norm / np.maximum(gn, 1e-6))
    return np.where(gn < max_norm, g, clipped)


def optax_agc(p: np.ndarray, g: np.ndarray, clip: float, eps: float) -> np.ndarray:
    """optax ``adaptive_grad_clip`` in float64 NumPy."""

    def unitwise(x):
        if np.squeeze(x).ndim <= 1:
            sq = np.sum(x * x, keepdims=True)
        elif x.ndim in (2, 3):
            sq = np.sum(x * x, axis=0, keepdims=True)
        else:
            sq = np.sum(x * x, axis=(0, 1, 2), keepdims=True)
        return np.broadcast_to(np.sqrt(sq), x.shape)

    g_norm, p_norm = unitwise(g), unitwise(p)
    max_norm = np.maximum(p_norm, eps) * clip
    clipped = g * (max_norm / np.maximum(g_norm, 1e-6))
    return np.where(g_norm < max_norm, g, clipped)
