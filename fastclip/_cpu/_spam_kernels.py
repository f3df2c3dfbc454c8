# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Numba CPU kernels of the fused SPAM and Stable-SPAM steps (``fastclip.torch``).

One pass over every tensor of one storage dtype per launch, through the
(address, size) tables of ``_pack`` (as ``_optim_kernels.tab_adamw``): each
element of the parameter, the gradient and the moments is read once and each
written element stored once, where the multi-tensor (``_foreach``) route of
``SPAMAdamW`` makes about ten passes.  Per-tensor values travel as the float64
rows of ``fastclip._spam_hparams`` (``P_*`` / ``Q_*`` columns).

Arithmetic is the ``_foreach`` route's, operation by operation, in the
storage's arithmetic type (float32 for float32 and 16-bit storage, float64
for float64): ``add(a, b, alpha)`` = fma(b, alpha, a), ``addcmul`` =
fma(value * t1, t2, s), ``addcdiv`` = s + value * t1 / t2 unfused, as torch's
CPU kernels compute them (see ``_optim_kernels.fma``); 16-bit data is widened
once on load and rounded once on store (the ``_foreach`` route rounds after
every operation).  No fast-math, for the reason ``_optim_kernels`` gives.

Kept apart from ``_optim_kernels`` so that FusedAdamW's kernels and their
cache entries are untouched; built by ``_build.jit_pair`` on first use (never
on the global-norm path).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from .._spam_hparams import (
    P_ALPHA,
    P_BETA1,
    P_BETA2,
    P_CLIP,
    P_DECAY,
    P_EPS,
    P_RESET,
    P_THETA,
    P_W1,
    P_W2,
    Q_B1,
    Q_BC2_SQRT,
    Q_BETA2,
    Q_DECAY,
    Q_EPS,
    Q_FACTOR,
    Q_HAT,
    Q_NEG_STEP,
    Q_RESET,
    Q_SHRINK,
    Q_USE_DECAY,
    Q_W1,
    Q_W2,
)
from ._elements import coef_like, narrow, widen
from ._intrinsics import address_as_pointer, imin
from ._kernels import chunk_starts, table_row
from ._optim_kernels import fma


@njit(fastmath=False, error_model="numpy", cache=False)
def seg_spam(p, g, m, v, row):  # type: ignore[no-untyped-def]
    """One slice of a SPAM step (``SPAMAdamW._group_step``, operation by operation).

    reset: m = v = 0; clip: where g*g > theta*v, g = sign(g) sqrt(theta*v)
    (the masked assignment: NaN never clipped); m = m*b1 + g*(1-b1);
    v = v*b2 + (1-b2)*g*g; p += alpha * m / (sqrt(v) + eps); p += p * decay.
    """
    x = p[0]
    zero = coef_like(0.0, x)
    b1 = coef_like(row[P_BETA1], x)
    w1 = coef_like(row[P_W1], x)
    b2 = coef_like(row[P_BETA2], x)
    w2 = coef_like(row[P_W2], x)
    eps = coef_like(row[P_EPS], x)
    alpha = coef_like(row[P_ALPHA], x)
    decay = coef_like(row[P_DECAY], x)
    theta = coef_like(row[P_THETA], x)
    clips = row[P_CLIP] != 0.0
    reset = row[P_RESET] != 0.0
    decays = row[P_DECAY] != 0.0
    for i in range(p.size):
        gi = widen(g[i])
        mi = zero if reset else widen(m[i])
        vi = zero if reset else widen(v[i])
        if clips:
            bound = vi * theta
            root = np.sqrt(bound)
            clipped = root if gi > zero else -root
            gi = clipped if gi * gi > bound else gi
        mi = fma(gi, w1, mi * b1)
        vi = fma(w2 * gi, gi, vi * b2)
        den = np.sqrt(vi) + eps
        pi = widen(p[i]) + alpha * mi / den  # addcdiv: not fused
        if decays:
            pi = fma(pi, decay, pi)
        p[i] = narrow(pi, p[i])
        m[i] = narrow(mi, m[i])
        v[i] = narrow(vi, v[i])


@njit(fastmath=False, error_model="numpy", cache=False)
def seg_stable_spam(p, g, m, v, vmax, row, amsgrad):  # type: ignore[no-untyped-def]
    """One slice of a Stable-SPAM step (``StableSPAMAdamW._group_step``).

    p *= decay; g = g * shrink where |g| > hat (AdaClip); g *= factor (AdaGN);
    m = m*b1 + g*(1-b1); v = v*b2 + (1-b2)*g*g; (amsgrad: vmax = max(vmax, v));
    p += neg_step * m / (sqrt(v) / bc2 + eps); reset: m = v = 0 afterwards.
    """
    x = p[0]
    zero = coef_like(0.0, x)
    hat = coef_like(row[Q_HAT], x)
    shrink = coef_like(row[Q_SHRINK], x)
    factor = coef_like(row[Q_FACTOR], x)
    decay = coef_like(row[Q_DECAY], x)
    b1 = coef_like(row[Q_B1], x)
    w1 = coef_like(row[Q_W1], x)
    b2 = coef_like(row[Q_BETA2], x)
    w2 = coef_like(row[Q_W2], x)
    bc2 = coef_like(row[Q_BC2_SQRT], x)
    eps = coef_like(row[Q_EPS], x)
    neg_step = coef_like(row[Q_NEG_STEP], x)
    decays = row[Q_USE_DECAY] != 0.0
    reset = row[Q_RESET] != 0.0
    for i in range(p.size):
        pi = widen(p[i])
        if decays:
            pi = pi * decay
        gi = widen(g[i])
        gi = gi * shrink if abs(gi) > hat else gi
        gi = gi * factor
        mi = fma(gi, w1, widen(m[i]) * b1)
        vi = fma(w2 * gi, gi, widen(v[i]) * b2)
        vd = vi
        if amsgrad:
            vm = widen(vmax[i])
            if not vm >= vi:  # torch.maximum: NaN in vi propagates
                vm = vi
            vmax[i] = narrow(vm, vmax[i])
            vd = vm
        den = np.sqrt(vd) / bc2 + eps
        p[i] = narrow(pi + neg_step * mi / den, p[i])  # addcdiv: not fused
        m[i] = narrow(zero if reset else mi, m[i])
        v[i] = narrow(zero if reset else vi, v[i])


# ``reassoc`` only: without it the float64 sum is one dependency chain; with it
# LLVM keeps several partial sums in vector lanes (20M float32, one thread:
# 16.8 -> 2.5 ms median of 9, same sum to 1e-15 relative).  The clipped value itself is
# computed as the _foreach route does (float32 multiply, no contraction).
@njit(fastmath={"reassoc"}, error_model="numpy", cache=False)
def seg_clipped_sq(g, hat, shrink):  # type: ignore[no-untyped-def]
    """float64 sum of squares of AdaClip's result (g * shrink where |g| > hat)."""
    x = g[0]
    h = coef_like(hat, x)
    s = coef_like(shrink, x)
    acc = 0.0
    for i in range(g.size):
        gi = widen(g[i])
        gi = gi * s if abs(gi) > h else gi
        acc += np.float64(gi) * np.float64(gi)
    return acc


# ------------------------------------------------------- table kernels


def tab_spam(p_addrs, g_addrs, m_addrs, v_addrs, sizes, like, hparams, chunk):  # type: ignore[no-untyped-def]
    """SPAM on every row of the tables (``hparams[t]``: row ``t``'s P_* values)."""
    starts = chunk_starts(sizes, chunk)
    nchunks = starts[-1]
    for c in prange(nchunks):
        t = table_row(starts, c)
        n = sizes[t]
        lo = (c - starts[t]) * chunk
        hi = imin(lo + chunk, n)
        if hi <= lo:
            continue
        p = carray(address_as_pointer(p_addrs[t], like), n)[lo:hi]
        g = carray(address_as_pointer(g_addrs[t], like), n)[lo:hi]
        m = carray(address_as_pointer(m_addrs[t], like), n)[lo:hi]
        v = carray(address_as_pointer(v_addrs[t], like), n)[lo:hi]
        seg_spam(p, g, m, v, hparams[t])


def tab_stable_spam(
    p_addrs, g_addrs, m_addrs, v_addrs, x_addrs, sizes, like, hparams, amsgrad, chunk
):  # type: ignore[no-untyped-def]
    """Stable-SPAM on every row; ``x_addrs`` (max_exp_avg_sq) read only with amsgrad."""
    starts = chunk_starts(sizes, chunk)
    nchunks = starts[-1]
    for c in prange(nchunks):
        t = table_row(starts, c)
        n = sizes[t]
        lo = (c - starts[t]) * chunk
        hi = imin(lo + chunk, n)
        if hi <= lo:
            continue
        p = carray(address_as_pointer(p_addrs[t], like), n)[lo:hi]
        g = carray(address_as_pointer(g_addrs[t], like), n)[lo:hi]
        m = carray(address_as_pointer(m_addrs[t], like), n)[lo:hi]
        v = carray(address_as_pointer(v_addrs[t], like), n)[lo:hi]
        x = carray(address_as_pointer(x_addrs[t], like), n)[lo:hi]
        seg_stable_spam(p, g, m, v, x, hparams[t], amsgrad)


def tab_clipped_sq(g_addrs, sizes, like, hats, shrinks, chunk, out):  # type: ignore[no-untyped-def]
    """``out[t]``: the float64 sum of squares of row t after AdaClip (one read)."""
    starts = chunk_starts(sizes, chunk)
    nchunks = starts[-1]
    partials = np.zeros(nchunks, np.float64)
    for c in prange(nchunks):
        t = table_row(starts, c)
        n = sizes[t]
        lo = (c - starts[t]) * chunk
        hi = imin(lo + chunk, n)
        if hi <= lo:
            continue
        g = carray(address_as_pointer(g_addrs[t], like), n)[lo:hi]
        partials[c] = seg_clipped_sq(g, hats[t], shrinks[t])
    for t in range(sizes.size):
        s = 0.0
        for c in range(starts[t], starts[t + 1]):
            s += partials[c]
        out[t] = s
