# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Numba CPU kernels for fused clip-and-step optimizers (SGD, AdamW).

Each kernel updates every tensor of one storage dtype in one launch, through
(address, size) tables of parameters, gradients and state buffers (as the
norm kernels of ``_kernels.py`` do), and multiplies the gradient by the
global-norm clip coefficient *inside* the update: the gradients are read once
by the norm kernel and once here, and never written.

Per-tensor hyperparameters travel as a float64 matrix ``hparams[t, k]`` so that
several parameter groups (e.g. no weight decay on biases) and per-tensor step
counts still cost one launch.

Arithmetic follows ``torch.optim``'s single-tensor code operation by
operation, in the storage's arithmetic type (float32 for float32 and 16-bit
storage, float64 for float64), so float32 results agree with torch to a few
ulps; 16-bit data is widened to float32 once per element and rounded once on
store (torch rounds after every operation).

Loops follow the core's rules (``_kernels.py``): slices first, then
``for i in range(s.size)`` so LLVM vectorises.  The per-element functions use
no fast-math at all: ``contract`` (FMA) and ``arcp`` (division by reciprocal)
each change float32 roundings and broke bit-parity with torch (measured: 1,348
of 100,000 ``exp_avg_sq`` values and 25% of the parameters off by one ulp
after one step); elementwise loops vectorise without them.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir  # noqa: F401  (IRBuilder.fma, used by the intrinsic below)
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from .._hparams import (
    A_BC2_SQRT,
    A_BETA2,
    A_DECAY,
    A_EPS,
    A_NEG_STEP,
    A_W1,
    A_W2,
    S_DAMP1,
    S_MODE,
    S_MOMENTUM,
    S_NEG_LR,
    S_NESTEROV,
    S_WD,
)
from ._elements import coef_like, narrow, widen
from ._intrinsics import address_as_pointer, imin
from ._kernels import chunk_starts, normal_in_type, table_row


@intrinsic
def fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """a * b + c with one rounding (LLVM ``llvm.fma``): torch's ``vec::fmadd``.

    torch's CPU kernels fuse exactly these operations (checked bit for bit on
    200,000 float32 values): ``add(a, b, alpha)`` = fma(b, alpha, a),
    ``lerp(s, e, w)`` = fma(w, e - s, s) (w < 0.5) or fma(w - 1, e - s, e),
    ``addcmul(s, t1, t2, value)`` = fma(value * t1, t2, s); ``mul``, ``div``
    by a tensor and ``addcdiv`` = s + value * t1 / t2 are not fused.
    """
    if not (isinstance(a, types.Float) and a == b == c):
        return None
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fma(args[0], args[1], args[2])

    return sig, codegen


@njit(fastmath=False, error_model="numpy", cache=False)
def seg_adamw(p, g, m, v, coef, hparams):  # type: ignore[no-untyped-def]
    """One slice of AdamW (torch.optim.AdamW, amsgrad=False), gradient times ``coef``.

    torch: p *= 1 - lr*wd; m.lerp_(g, 1-b1); v = v*b2 + (1-b2)*g*g;
    p += (-step_size) * m / (sqrt(v) / sqrt(bc2) + eps).
    """
    x = p[0]
    c = coef_like(coef, x)
    # A factor float32 would flush (1e30 gradients clipped to 1e-30: 1e-60) is
    # applied in float64 and the product rounded once; otherwise torch's float32
    # arithmetic is kept (bit-parity with torch.optim after clip_grad_norm_).
    exact = normal_in_type(c, coef)
    decay = coef_like(hparams[A_DECAY], x)
    w1 = coef_like(hparams[A_W1], x)
    b2 = coef_like(hparams[A_BETA2], x)
    w2 = coef_like(hparams[A_W2], x)
    eps = coef_like(hparams[A_EPS], x)
    neg_step = coef_like(hparams[A_NEG_STEP], x)
    bc2 = coef_like(hparams[A_BC2_SQRT], x)
    small = hparams[A_W1] < 0.5
    w1m = w1 - coef_like(1.0, x)
    for i in range(p.size):
        gi = widen(g[i]) * c if exact else coef_like(np.float64(widen(g[i])) * coef, x)
        mi = widen(m[i])
        if small:
            mi = fma(w1, gi - mi, mi)
        else:
            mi = fma(w1m, gi - mi, gi)
        vi = widen(v[i]) * b2
        vi = fma(w2 * gi, gi, vi)
        den = np.sqrt(vi) / bc2 + eps
        pi = widen(p[i]) * decay
        p[i] = narrow(pi + neg_step * mi / den, p[i])  # addcdiv: not fused
        m[i] = narrow(mi, m[i])
        v[i] = narrow(vi, v[i])


@njit(fastmath=False, error_model="numpy", cache=False)
def seg_adamw_amsgrad(p, g, m, v, vmax, coef, hparams):  # type: ignore[no-untyped-def]
    """As ``seg_adamw`` with amsgrad: vmax = maximum(vmax, v), used in the denominator."""
    x = p[0]
    c = coef_like(coef, x)
    # A factor float32 would flush (1e30 gradients clipped to 1e-30: 1e-60) is
    # applied in float64 and the product rounded once; otherwise torch's float32
    # arithmetic is kept (bit-parity with torch.optim after clip_grad_norm_).
    exact = normal_in_type(c, coef)
    decay = coef_like(hparams[A_DECAY], x)
    w1 = coef_like(hparams[A_W1], x)
    b2 = coef_like(hparams[A_BETA2], x)
    w2 = coef_like(hparams[A_W2], x)
    eps = coef_like(hparams[A_EPS], x)
    neg_step = coef_like(hparams[A_NEG_STEP], x)
    bc2 = coef_like(hparams[A_BC2_SQRT], x)
    small = hparams[A_W1] < 0.5
    w1m = w1 - coef_like(1.0, x)
    for i in range(p.size):
        gi = widen(g[i]) * c if exact else coef_like(np.float64(widen(g[i])) * coef, x)
        mi = widen(m[i])
        if small:
            mi = fma(w1, gi - mi, mi)
        else:
            mi = fma(w1m, gi - mi, gi)
        vi = widen(v[i]) * b2
        vi = fma(w2 * gi, gi, vi)
        vm = widen(vmax[i])
        if not vm >= vi:  # torch.maximum: NaN in vi propagates
            vm = vi
        den = np.sqrt(vm) / bc2 + eps
        pi = widen(p[i]) * decay
        p[i] = narrow(pi + neg_step * mi / den, p[i])  # addcdiv: not fused
        m[i] = narrow(mi, m[i])
        v[i] = narrow(vi, v[i])
        vmax[i] = narrow(vm, vmax[i])


@njit(fastmath=False, error_model="numpy", cache=False)
def seg_sgd(p, g, buf, coef, hparams):  # type: ignore[no-untyped-def]
    """One slice of torch.optim.SGD, gradient times ``coef``.

    torch: g = g + wd*p; buf = g (first step) or buf*momentum + (1-dampening)*g;
    g = g + momentum*buf (Nesterov) or buf; p += (-lr) * g.
    """
    x = p[0]
    c = coef_like(coef, x)
    # A factor float32 would flush (1e30 gradients clipped to 1e-30: 1e-60) is
    # applied in float64 and the product rounded once; otherwise torch's float32
    # arithmetic is kept (bit-parity with torch.optim after clip_grad_norm_).
    exact = normal_in_type(c, coef)
    wd = coef_like(hparams[S_WD], x)
    mom = coef_like(hparams[S_MOMENTUM], x)
    damp1 = coef_like(hparams[S_DAMP1], x)
    neg_lr = coef_like(hparams[S_NEG_LR], x)
    mode = int(hparams[S_MODE])
    nesterov = hparams[S_NESTEROV] != 0.0
    use_wd = hparams[S_WD] != 0.0
    if mode == 0:
        if use_wd:
            for i in range(p.size):
                pi = widen(p[i])
                gw = widen(g[i]) * c if exact else coef_like(np.float64(widen(g[i])) * coef, x)
                gi = fma(pi, wd, gw)
                p[i] = narrow(fma(gi, neg_lr, pi), p[i])
        else:
            for i in range(p.size):
                pi = widen(p[i])
                gw = widen(g[i]) * c if exact else coef_like(np.float64(widen(g[i])) * coef, x)
                p[i] = narrow(fma(gw, neg_lr, pi), p[i])
        return
    for i in range(p.size):
        pi = widen(p[i])
        gi = widen(g[i]) * c if exact else coef_like(np.float64(widen(g[i])) * coef, x)
        if use_wd:
            gi = fma(pi, wd, gi)
        if mode == 1:
            bi = gi
        else:
            bi = widen(buf[i]) * mom
            bi = fma(gi, damp1, bi)
        buf[i] = narrow(bi, buf[i])
        if nesterov:
            gi = fma(bi, mom, gi)
        else:
            gi = bi
        p[i] = narrow(fma(gi, neg_lr, pi), p[i])


# ------------------------------------------------------- table kernels


def tab_adamw(
    p_addrs, g_addrs, m_addrs, v_addrs, x_addrs, sizes, like, coef, hparams, amsgrad, chunk
):  # type: ignore[no-untyped-def]
    """AdamW on every row of the tables; ``x_addrs`` (max_exp_avg_sq) read only with amsgrad."""
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
        if amsgrad:
            x = carray(address_as_pointer(x_addrs[t], like), n)[lo:hi]
            seg_adamw_amsgrad(p, g, m, v, x, coef, hparams[t])
        else:
            seg_adamw(p, g, m, v, coef, hparams[t])


def tab_sgd(p_addrs, g_addrs, b_addrs, sizes, like, coef, hparams, chunk):  # type: ignore[no-untyped-def]
    """SGD on every row of the tables; ``b_addrs`` (momentum buffers) unused in mode 0."""
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
        if hparams[t, S_MODE] != 0.0:
            b = carray(address_as_pointer(b_addrs[t], like), n)[lo:hi]
        else:
            b = p  # unused
        seg_sgd(p, g, b, coef, hparams[t])
