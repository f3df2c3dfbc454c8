"""fastclip.adaptive.QuantileClip against (1) a float64 NumPy transcription of
Andrew et al., arXiv:1905.03871, Algorithm 1 as Opacus implements it
(``opacus/optimizers/adaclipoptimizer.py``: ``clip_and_accumulate`` counts
``factor >= 1`` with factor ``clamp(C / (n + 1e-6), max=1)``; ``add_noise``
adds N(0, unclipped_num_std^2) to the count; ``update_max_grad_norm`` does
``C *= exp(-lr * (count / m - quantile))`` and clamps) on recorded per-sample
gradient sequences, with and without noise, and (2) Opacus' AdaClipDPOptimizer
itself with the count noise set to zero; plus state dicts, policies, refusals.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _backends import Backend, clipper_state, to_f64, unchanged

import fastclip
from fastclip.adaptive import QuantileClip

SHAPES = [(4, 3), (6,)]


class QuantileOracle:
    def __init__(self, c, quantile, lr, lo, hi, std, seed):
        self.c, self.q, self.lr, self.lo, self.hi, self.std = c, quantile, lr, lo, hi, std
        self.rng = np.random.default_rng(seed)
        self.unclipped = self.size = 0

    def clip(self, grads, update=True):
        flat = np.concatenate([g.reshape(g.shape[0], -1) for g in grads], axis=1)
        norms = np.sqrt(np.sum(flat * flat, axis=1))
        f = np.minimum(self.c / (norms + 1e-6), 1.0)
        self.unclipped += int(np.sum(~(f < 1)))
        self.size += len(f)
        out = [np.einsum("i,i...", f, g) for g in grads]
        if update:
            self.update()
        return out, norms

    def update(self):
        noise = self.rng.normal(0.0, self.std) if self.std > 0 else 0.0
        frac = (self.unclipped + noise) / self.size
        self.c *= math.exp(-self.lr * (frac - self.q))
        self.c = self.hi if self.c > self.hi else (self.lo if self.c < self.lo else self.c)
        self.unclipped = self.size = 0


def batches(steps=30, seed=0):
    """Per-sample gradients of varying batch size and scale (norms spread over a
    decade, so the quantile moves), with a batch of x30 spikes at step 11."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        b = int(rng.integers(3, 9))
        scale = np.exp(rng.normal(size=(b, 1)))
        gs = [rng.normal(size=(b, *s)) * scale.reshape(b, *([1] * len(s))) for s in SHAPES]
        if t == 11:
            gs = [g * 30.0 for g in gs]
        out.append(gs)
    return out


@pytest.mark.parametrize("backend", [Backend.NUMPY, Backend.TORCH], ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("std", [0.0, 1.5])
def test_quantile_clip_matches_the_formula(backend, dtype, std):
    if backend.is_torch:
        pytest.importorskip("torch")
    kw = dict(target_unclipped_quantile=0.6, clipbound_learning_rate=0.3)
    oracle = QuantileOracle(2.0, 0.6, 0.3, 0.1, 50.0, std, seed=4)
    clip = QuantileClip(
        2.0, **kw, min_clipbound=0.1, max_clipbound=50.0, unclipped_num_std=std, seed=4
    )
    rtol = 1e-12 if dtype == "float64" else 2e-6
    bounds = []
    for gs in batches():
        arrays = [backend.asarray(g, dtype) for g in gs]
        want, want_norms = oracle.clip([to_f64(a) for a in arrays])
        got = clip.clip_per_sample(arrays)
        for a, w in zip(got.grads, want):
            # a sum over the batch: cancellation, so the error is relative to its terms
            np.testing.assert_allclose(to_f64(a), w, rtol=rtol, atol=rtol * np.abs(w).max())
        np.testing.assert_allclose(to_f64(got.norms), want_norms, rtol=rtol)
        assert clip.max_norm == pytest.approx(oracle.c, rel=rtol)
        bounds.append(clip.max_norm)
    assert len(set(bounds)) > 10  # the bound moved


def test_quantile_clip_accumulates_micro_batches_until_update():
    oracle = QuantileOracle(1.0, 0.5, 0.2, 0.0, math.inf, 0.0, seed=None)
    clip = QuantileClip(1.0)
    seq = batches(12, seed=2)
    for i, gs in enumerate(seq):
        last = i % 3 == 2
        want, _ = oracle.clip(gs, update=last)
        got = clip.clip_per_sample(gs, update=last)
        for a, w in zip(got.grads, want):
            np.testing.assert_allclose(a, w, rtol=1e-12)
        assert clip.max_norm == pytest.approx(oracle.c, rel=1e-14)
    assert clip.step == 4


def test_quantile_clip_matches_opacus_adaclip_without_count_noise(monkeypatch):
    torch = pytest.importorskip("torch")
    ada = pytest.importorskip("opacus.optimizers.adaclipoptimizer")
    real = ada._generate_noise

    def no_count_noise(std, reference, generator=None, secure_mode=False):
        if reference.dim() == 0:  # the count's noise; the gradients' has std 0 anyway
            return torch.zeros_like(reference)
        return real(std, reference, generator, secure_mode)

    monkeypatch.setattr(ada, "_generate_noise", no_count_noise)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    opt = ada.AdaClipDPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        target_unclipped_quantile=0.7,
        clipbound_learning_rate=0.25,
        max_clipbound=20.0,
        min_clipbound=0.05,
        unclipped_num_std=1.0,
        max_grad_norm=1.5,
        expected_batch_size=None,
        loss_reduction="sum",
    )
    clip = QuantileClip(1.5, 0.7, 0.25, min_clipbound=0.05, max_clipbound=20.0)
    for gs in batches(25, seed=9):
        for p, g in zip(params, gs):
            p.grad_sample = torch.tensor(g)
            p.grad = torch.zeros_like(p)
        # Opacus computes the bound in float32 (the noised count is a float32 tensor):
        # each step starts from its bound, so the clip is compared exactly and the
        # update to float32's rounding
        clip.max_norm = float(opt.max_grad_norm)
        opt.step()
        got = clip.clip_per_sample(gs)
        for p, a in zip(params, got.grads):
            np.testing.assert_allclose(a, p.grad.numpy(), rtol=1e-12, atol=1e-15)
        assert clip.max_norm == pytest.approx(float(opt.max_grad_norm), rel=1e-6)
        opt.zero_grad()


def test_quantile_clip_state_dict_round_trip_continues_the_noise():
    seq = batches(20, seed=1)
    a = QuantileClip(1.0, unclipped_num_std=2.0, seed=11)
    for gs in seq[:8]:
        a.clip_per_sample(gs)
    sd = json.loads(json.dumps(a.state_dict()))
    b = QuantileClip(5.0)
    b.load_state_dict(sd)
    for gs in seq[8:]:
        ra, rb = a.clip_per_sample(gs), b.clip_per_sample(gs)
        assert a.max_norm == b.max_norm
        for x, y in zip(ra.grads, rb.grads):
            np.testing.assert_array_equal(x, y)
    before = clipper_state(b)
    for bad, err in [
        (dict(sd, rng=[1, 2]), TypeError),
        (dict(sd, unclipped_num=5, sample_size=3), ValueError),
        (dict(sd, max_norm=-1.0), ValueError),
    ]:
        with pytest.raises(err, match=r"fastclip.adaptive.QuantileClip"):
            b.load_state_dict(bad)
    assert clipper_state(b) == before


def test_quantile_clip_nonfinite_policies():
    gs = [g.copy() for g in batches(1, seed=3)[0]]
    gs[0][1, 0] = math.nan
    # propagate (Opacus): the NaN sample counts as unclipped, its factor is NaN
    oracle = QuantileOracle(1.0, 0.5, 0.2, 0.0, math.inf, 0.0, None)
    with np.errstate(invalid="ignore"):
        want, _ = oracle.clip(gs)
    clip = QuantileClip(1.0)
    got = clip.clip_per_sample(gs)
    for a, w in zip(got.grads, want):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(w))
    assert clip.max_norm == pytest.approx(oracle.c, rel=1e-14)
    clip = QuantileClip(1.0, nonfinite="error")
    before = clipper_state(clip)
    with unchanged(*gs), pytest.raises(fastclip.NonFiniteNormError):
        clip.clip_per_sample(gs)
    assert clipper_state(clip) == before
    clip = QuantileClip(1.0, nonfinite="skip")
    with unchanged(*gs):
        got = clip.clip_per_sample(gs)
    assert clip.last_step_skipped and clip.max_norm == 1.0 and clip.sample_size == 0
    for a, g in zip(got.grads, gs):
        np.testing.assert_array_equal(a, g.sum(axis=0))


def test_quantile_clip_refusals_change_nothing():
    clip = QuantileClip(1.0, unclipped_num_std=1.0, seed=0)
    clip.clip_per_sample(batches(1)[0])
    before = clipper_state(clip)
    with pytest.raises(ValueError, match=r"fastclip.adaptive.QuantileClip.clip_per_sample"):
        clip.clip_per_sample([np.ones((3, 2)), np.ones((4, 2))])
    with pytest.raises(TypeError, match=r"call .clip_per_sample"):
        clip([np.ones(3)])
    assert clipper_state(clip) == before
    with pytest.raises(ValueError, match="min_clipbound"):
        QuantileClip(1.0, min_clipbound=2.0, max_clipbound=1.0)
    with pytest.raises(ValueError, match=r"fastclip.adaptive.QuantileClip: target_unclipped"):
        QuantileClip(1.0, target_unclipped_quantile=1.5)
    with pytest.raises(ValueError, match="Theorem 1"):
        clip.noise_multiplier(3.0)
    # Opacus' effective gradient noise (add_noise): (sigma^-2 - (2 sigma_b)^-2)^(-1/2)
    assert clip.noise_multiplier(1.0) == pytest.approx((1.0 - 0.25) ** -0.5, rel=1e-15)
