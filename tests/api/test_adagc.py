"""fastclip.adaptive.AdaGC against a float64 NumPy transcription of the authors'
PyTorch code: class ``AdaGC`` in ``megatron/optimizer/clip_grads.py`` of the
``megatron-gpt2.patch`` of github.com/lishuai-97/AdaGC (commit 32c249f), the
formulas of arXiv:2502.11034 eq. (3)-(4), on a recorded 30-step gradient
sequence with injected spikes; the non-finite policies, state dicts, and
refused calls that leave the clipper and the gradients as they were.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _backends import Backend, clipper_state, to_f64, unchanged

import fastclip
from fastclip.adaptive import AdaGC

SHAPES = [(8, 5), (5,), (3, 4, 2), (1,)]


class AdaGCOracle:
    """The reference's ``clip_by_norm`` (per tensor, float64): ``steps`` counts
    every call; ``steps <= start_clip_steps`` is Megatron's global clip and the
    state keeps the smallest clipped norm; then a tensor whose norm exceeds
    ``clip_ratio * state`` is scaled by ``clip_ratio * state / (norm + eps)``
    and the state becomes ``state * beta + min(norm, clip_ratio * state) * (1 - beta)``."""

    def __init__(self, max_norm, clip_ratio, beta, start, eps=1e-6):
        self.max_norm, self.ratio, self.beta, self.start, self.eps = (
            max_norm,
            clip_ratio,
            beta,
            start,
            eps,
        )
        self.steps = 0
        self.state: dict[int, float] = {}

    def __call__(self, grads):
        self.steps += 1
        grads = [np.array(g, np.float64) for g in grads]
        total = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
        if self.steps <= self.start:
            coef = self.max_norm / (total + self.eps)
            if coef < 1.0:
                grads = [g * coef for g in grads]
            for i, g in enumerate(grads):
                n = float(np.linalg.norm(g.ravel()))
                if i not in self.state:
                    self.state[i] = n
                if n < self.state[i]:
                    self.state[i] = n
        else:
            for i, g in enumerate(grads):
                n = float(np.linalg.norm(g.ravel()))
                if i not in self.state:
                    self.state[i] = n
                avg = self.state[i]
                if n > self.ratio * avg:
                    grads[i] = g * ((self.ratio * avg) / (n + self.eps))
                    n = self.ratio * avg
                self.state[i] = avg * self.beta + n * (1.0 - self.beta)
        return grads, total


def recorded(steps=30, seed=0):
    """Seeded gradients whose scale shrinks per tensor, with spikes: one tensor x50 at
    steps 12 and 21, every tensor x8 at step 17."""
    rng = np.random.default_rng(seed)
    seq = []
    for t in range(steps):
        gs = [rng.normal(size=s) * (0.5 + 1.5 / (1 + t)) * (i + 1) for i, s in enumerate(SHAPES)]
        if t in (12, 21):
            gs[t % len(gs)] *= 50.0
        if t == 17:
            gs = [g * 8.0 for g in gs]
        seq.append(gs)
    return seq


@pytest.mark.parametrize("backend", [Backend.NUMPY, Backend.TORCH], ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("inplace", [True, False])
def test_adagc_matches_the_reference_on_a_recorded_sequence(backend, dtype, inplace):
    if backend.is_torch:
        pytest.importorskip("torch")
    oracle = AdaGCOracle(max_norm=4.0, clip_ratio=1.04, beta=0.9, start=5)
    clipper = AdaGC(max_norm=4.0, clip_ratio=1.04, beta=0.9, warmup_steps=5)
    rtol = 1e-12 if dtype == "float64" else 2e-6
    n_clipped = 0
    for gs in recorded():
        arrays = [backend.asarray(g, dtype) for g in gs]
        want, want_total = oracle([to_f64(a) for a in arrays])
        if inplace:
            total = clipper(arrays)
            got = arrays
        else:
            got, total = clipper.clip(arrays)
        for a, w in zip(got, want):
            np.testing.assert_allclose(to_f64(a), w, rtol=rtol, atol=1e-300)
        assert float(total) == pytest.approx(want_total, rel=rtol)
        ema = [oracle.state[i] for i in range(len(SHAPES))]
        np.testing.assert_allclose(clipper.norm_ema, ema, rtol=rtol * 10)
        n_clipped += sum(
            not np.allclose(to_f64(a), g)
            for a, g in zip(got, [backend.asarray(g, dtype) for g in gs])
        )
    assert clipper.step == 30 and n_clipped >= 3  # the spikes were clipped


def test_adagc_without_warmup_starts_each_ema_at_the_first_norm():
    oracle = AdaGCOracle(max_norm=1.0, clip_ratio=0.9, beta=0.5, start=0)
    clipper = AdaGC(max_norm=1.0, clip_ratio=0.9, beta=0.5, warmup_steps=0)
    for gs in recorded(6, seed=3):
        want, _ = oracle(gs)
        got, _ = clipper.clip(gs)
        for a, w in zip(got, want):
            np.testing.assert_allclose(a, w, rtol=1e-12)


def _with(gs, value):
    gs = [g.copy() for g in gs]
    gs[1][2] = value
    return gs


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_adagc_nonfinite_policies(value):
    seq = recorded(12, seed=5)
    seq[8] = _with(seq[8], value)
    # propagate: the reference's arithmetic (NaN never clipped and enters the EMA; inf
    # clipped with coefficient 0, so the inf entry becomes NaN)
    oracle = AdaGCOracle(2.0, 1.04, 0.9, 3)
    clipper = AdaGC(2.0, 1.04, 0.9, 3)
    with np.errstate(invalid="ignore"):
        for gs in seq:
            want, _ = oracle(gs)
            got, _ = clipper.clip(gs)
            for a, w in zip(got, want):
                np.testing.assert_allclose(a, w, rtol=1e-12)
    np.testing.assert_allclose(clipper.norm_ema, [oracle.state[i] for i in range(4)], rtol=1e-12)
    # error and skip: the step is refused or skipped; state and gradients unchanged
    for policy in ("error", "skip"):
        oracle = AdaGCOracle(2.0, 1.04, 0.9, 3)
        clipper = AdaGC(2.0, 1.04, 0.9, 3, nonfinite=policy)
        for t, gs in enumerate(seq):
            gs = [g.copy() for g in gs]
            if t == 8:
                before = clipper_state(clipper)
                with unchanged(*gs):
                    if policy == "error":
                        with pytest.raises(fastclip.NonFiniteNormError):
                            clipper(gs)
                    else:
                        assert not math.isfinite(float(clipper(gs)))
                        assert clipper.last_step_skipped
                after = json.loads(clipper_state(clipper))
                assert after[0] == json.loads(before)[0]
                continue
            want, _ = oracle(gs)
            clipper(gs)
            for a, w in zip(gs, want):
                np.testing.assert_allclose(a, w, rtol=1e-12)


def test_adagc_state_dict_round_trip_continues_the_run():
    seq = recorded()
    a = AdaGC(3.0, 1.02, 0.95, 4)
    for gs in seq[:10]:
        a.clip(gs)
    sd = json.loads(json.dumps(a.state_dict()))
    b = AdaGC()
    b.load_state_dict(sd)
    assert b.step == 10 and b.norm_ema == a.norm_ema
    for gs in seq[10:]:
        ga, _ = a.clip(gs)
        gb, _ = b.clip(gs)
        for x, y in zip(ga, gb):
            np.testing.assert_array_equal(x, y)
    bad = dict(sd, norm_ema=None)  # step 10 without the EMA
    before = clipper_state(b)
    with pytest.raises(ValueError, match=r"fastclip.adaptive.AdaGC.load_state_dict"):
        b.load_state_dict(bad)
    with pytest.raises(ValueError, match="norm_ema holds norms"):
        b.load_state_dict(dict(sd, norm_ema=[-1.0] * 4))
    assert clipper_state(b) == before


def test_adagc_refused_calls_change_nothing():
    seq = recorded(3)
    clipper = AdaGC(1.0, warmup_steps=1)
    clipper(seq[0])
    before = clipper_state(clipper)
    gs = [g.copy() for g in seq[1]]
    gs[2].flags.writeable = False
    with unchanged(*gs):
        with pytest.raises(
            ValueError, match=r"fastclip.adaptive.AdaGC.__call__: gradient 2 is read-only"
        ):
            clipper(gs)
        with pytest.raises(ValueError, match="3 gradients, but the state holds 4"):
            clipper(gs[:3])
        with pytest.raises(TypeError, match="takes no parameters"):
            clipper.clip(gs, gs)
        # a total norm from elsewhere (fastclip.distributed.clip_with_) has no
        # meaning for per-tensor clipping: refused, not ignored
        with pytest.raises(TypeError, match=r"AdaGC.clip: takes no total_norm"):
            clipper.clip(gs, total_norm=1.0)
    assert clipper_state(clipper) == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clip_ratio=-1.0), "clip_ratio"),
        (dict(beta=1.0), "beta"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(max_norm=math.nan), "max_norm"),
        (dict(eps=-1.0), "eps"),
        (dict(nonfinite="ignore"), "nonfinite"),
    ],
)
def test_adagc_bad_arguments_name_the_class(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=rf"fastclip.adaptive.AdaGC: {match}"):
        AdaGC(**kwargs)
