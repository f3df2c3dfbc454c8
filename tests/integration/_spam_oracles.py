"""Float64 NumPy transcriptions of the SPAM and Stable-SPAM reference optimizers
(see ``test_spam.py`` for the sources), and their cosine schedules read from torch's
``CosineAnnealingLR`` exactly as the references build it (``CosineDecay``)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

__all__ = ["SpamOracle", "StableSpamOracle", "cosine_decay", "round_oracle"]


def cosine_decay(rate, t_max, eta_min):
    """The references' ``CosineDecay(rate, t_max, eta_min).get_dr``, through torch."""
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, t_max + 1, eta_min, -1)

    def get_dr(step):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the epoch argument is deprecated
            sched.step(step)
        return sgd.param_groups[0]["lr"]

    return get_dr


class SpamOracle:
    def __init__(self, shapes, lr, betas, eps, wd, thres, delta_t, warmup, accu, correct_bias=True):
        self.lr, self.betas, self.eps, self.wd, self.cb = lr, betas, eps, wd, correct_bias
        self.thres, self.delta_t, self.warmup_steps, self.accu = thres, delta_t, warmup, accu
        self.total_step, self.current_step = 0, warmup + 1
        self.decay = cosine_decay(0.99, warmup, 0)
        self.m = [np.zeros(s) for s in shapes]
        self.v = [np.zeros(s) for s in shapes]
        self.k = [0] * len(shapes)

    def get_dr(self, s):
        return 0.0 if s >= self.warmup_steps else self.decay(s)

    def step(self, params, grads):
        b1, b2 = self.betas
        scale = 1 - self.get_dr(self.current_step)
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:  # the references skip parameters without a gradient
                continue
            g = g.copy()
            if (self.total_step + 1) % self.delta_t == 0:
                self.m[i], self.v[i] = np.zeros_like(g), np.zeros_like(g)
            self.k[i] += 1
            if self.thres != 0:
                cur = self.total_step + 1
                if cur >= self.accu and cur % self.delta_t >= self.accu:
                    with np.errstate(invalid="ignore", over="ignore"):
                        mask = g**2 > self.thres * self.v[i]
                    g[mask] = np.sign(g[mask]) * np.sqrt(self.v[i][mask] * self.thres)
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            denom = np.sqrt(self.v[i]) + self.eps
            size = self.lr
            if self.cb:
                size *= math.sqrt(1 - b2 ** self.k[i]) / (1 - b1 ** self.k[i])
            p -= size * scale * (self.m[i] / denom)
            if self.wd > 0:
                p -= self.lr * self.wd * p
        self.total_step += 1
        self.current_step += 1
        if self.total_step != 0 and (self.total_step + 1) % self.delta_t == 0:
            self.current_step = 0


class StableSpamOracle:
    def __init__(self, shapes, lr, betas, eps, wd, amsgrad, g1, g2, g3, total_t, eta_min, gap):
        self.lr, self.betas, self.eps, self.wd, self.amsgrad = lr, betas, eps, wd, amsgrad
        self.g1, self.g2, self.theta = (betas[0] if g1 == -1 else g1), g2, g3
        self.total_t, self.gap, self.total_steps = total_t, gap, 0
        if total_t is not None:
            self.decay = cosine_decay(1.0, total_t, eta_min)
        n = len(shapes)
        self.m = [np.zeros(s) for s in shapes]
        self.v = [np.zeros(s) for s in shapes]
        self.vmax = [np.zeros(s) for s in shapes]
        self.k = [0] * n
        self.m_norm, self.v_norm, self.m_max = [0.0] * n, [0.0] * n, [0.0] * n

    def step(self, params, grads):
        self.total_steps += 1
        scale = self.decay(self.total_steps) if self.total_t is not None else 1.0
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:  # the references skip parameters without a gradient
                continue
            p *= 1 - self.lr * self.wd
            g = g.copy()
            max_g = np.max(np.abs(g))
            self.k[i] += 1
            self.m_max[i] = self.theta * self.m_max[i] + (1 - self.theta) * max_g
            hat = self.m_max[i] / (1 - self.theta ** self.k[i])
            with np.errstate(invalid="ignore"):
                mask = np.abs(g) > hat
            if mask.sum() > 0:
                g[mask] = g[mask] / max_g * hat
            n = np.linalg.norm(g.ravel())
            g1s = self.g1 * scale
            self.m_norm[i] = g1s * self.m_norm[i] + (1 - g1s) * n
            self.v_norm[i] = self.g2 * self.v_norm[i] + (1 - self.g2) * n**2
            m_hat = self.m_norm[i] / (1 - g1s ** self.k[i])
            v_hat = self.v_norm[i] / (1 - self.g2 ** self.k[i])
            c = m_hat / (np.sqrt(v_hat) + self.eps)
            if n > 0:
                g = g / n * c
            m, v = self.m[i], self.v[i]  # bound before the reset, as the reference
            if self.gap != 0 and self.total_steps % self.gap == 0:
                self.m[i], self.v[i] = np.zeros_like(g), np.zeros_like(g)
                self.k[i] = 1
            b1, b2 = self.betas
            b1 = b1 * scale
            bc1, bc2 = 1 - b1 ** self.k[i], 1 - b2 ** self.k[i]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            if self.amsgrad:
                np.maximum(self.vmax[i], v, out=self.vmax[i])
                denom = np.sqrt(self.vmax[i]) / math.sqrt(bc2) + self.eps
            else:
                denom = np.sqrt(v) / math.sqrt(bc2) + self.eps
            p -= self.lr / bc1 * (m / denom)


def round_oracle(oracle, params, rnd):
    """Round an oracle's parameters (in place) and state with ``rnd`` (e.g. to
    bfloat16 and back), as a route that stores them in that dtype each step."""
    for p in params:
        p[...] = rnd(p)
    for name in ("m", "v", "vmax"):
        values = getattr(oracle, name, None)
        if values is not None:
            setattr(oracle, name, [rnd(x) for x in values])
    for name in ("m_norm", "v_norm", "m_max"):
        values = getattr(oracle, name, None)
        if values is not None:
            setattr(oracle, name, [float(rnd(np.float64(x))) for x in values])
