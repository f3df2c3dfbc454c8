"""fastclip.adaptive.StableSPAMClip against a float64 NumPy transcription of the gradient
half of Stable-SPAM's reference optimizer (``galore_torch/stablespam.py`` of
github.com/TianjinYellow/StableSPAM: AdaClip, AdaGN, the count restart at a reset
step; arXiv:2502.17055 Algorithm 1), on a recorded 30-step gradient sequence with
spikes, on every CPU backend; the non-finite policies, state dicts, and refused calls
that leave the clipper and the gradients as they were.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from _backends import CPU, Backend, clipper_state, params, to_f64, unchanged

import fastclip
from fastclip.adaptive import StableSPAMClip, stable_spam_scale

SHAPES = [(8, 5), (5,), (3, 4, 2), (1,)]


def cosine_decay(rate, t_max, eta_min):
    """The reference's ``CosineDecay(rate, t_max, eta_min).get_dr``: torch's
    ``CosineAnnealingLR(T_max=t_max + 1)`` stepped to an epoch."""
    torch = pytest.importorskip("torch", reason="the reference's schedule is torch's")
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, t_max + 1, eta_min, -1)

    def get_dr(step):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the epoch argument is deprecated
            sched.step(step)
        return sgd.param_groups[0]["lr"]

    return get_dr


class GradOracle:
    """The reference's per-parameter gradient transform, line for line, float64: its
    ``m_max_t``, ``m_norm_t``, ``v_norm_t`` and ``step`` (reset to 1 at a reset step,
    after the transform), with ``scale`` from torch's ``CosineAnnealingLR`` as the
    reference builds it (``CosineDecay(1.0, total_T, eta_min)``)."""

    def __init__(self, n, g1, g2, theta, eps, total_t, eta_min, gap):
        self.g1, self.g2, self.theta, self.eps, self.gap = g1, g2, theta, eps, gap
        self.total_t, self.total_steps = total_t, 0
        if total_t is not None:
            self.decay = cosine_decay(1.0, total_t, eta_min)
        self.k = [0] * n
        self.m_max, self.m_norm, self.v_norm = [0.0] * n, [0.0] * n, [0.0] * n

    def __call__(self, grads):
        self.total_steps += 1
        scale = self.decay(self.total_steps) if self.total_t is not None else 1.0
        out = []
        for i, g in enumerate(grads):
            g = np.array(g, np.float64)
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
            if n > 0:
                g = g / n * (m_hat / (np.sqrt(v_hat) + self.eps))
            if self.gap != 0 and self.total_steps % self.gap == 0:
                self.k[i] = 1
            out.append(g)
        return out


def recorded(steps=30, seed=0):
    """Seeded gradients whose scale shrinks, with spikes: a few entries x200 at steps
    9 and 16, one tensor x50 at step 21."""
    rng = np.random.default_rng(seed)
    seq = []
    for t in range(steps):
        gs = [rng.normal(size=s) * (0.5 + 1.5 / (1 + t)) * (i + 1) for i, s in enumerate(SHAPES)]
        if t in (9, 16):
            gs[0].reshape(-1)[[3, 17]] *= 200.0
            gs[2].reshape(-1)[5] *= 200.0
        if t == 21:
            gs[1] = gs[1] * 50.0
        seq.append(gs)
    return seq


CONFIG = dict(g1=0.7, g2=0.9, theta=0.9, eps=1e-8, total_t=40, eta_min=0.5, gap=11)


def _clipper(**kw):
    c = dict(CONFIG, **kw)
    return StableSPAMClip(
        c["g1"], c["g2"], c["theta"], eps=c["eps"], total_t=c["total_t"],
        eta_min=c["eta_min"], update_proj_gap=c["gap"], **kw.get("extra", {}),
    )  # fmt: skip


def _rtol(dtype):
    return {"float64": 1e-12, "float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}[dtype]


MATRIX = [
    pytest.param(*p.values, inplace, id=f"{p.id}-{'inplace' if inplace else 'clip'}")
    for p in params(CPU, ("float64", "float32", "bfloat16"))
    for inplace in (True, False)
    if p.values[0].writeable or not inplace  # read-only NumPy: out of place only
]


@pytest.mark.parametrize(("backend", "dtype", "inplace"), MATRIX)
def test_matches_the_reference_on_a_recorded_sequence(backend, dtype, inplace):
    oracle = GradOracle(len(SHAPES), **CONFIG)
    clipper = _clipper()
    rtol = _rtol(dtype)
    clipped = 0
    for gs in recorded():
        arrays = [backend.asarray(g, dtype) for g in gs]
        inputs = [to_f64(a).copy() for a in arrays]  # a float64 tensor's is a view
        want = oracle(inputs)  # from the values as stored, as the clipper sees them
        if inplace:
            total = clipper(arrays)
            got = arrays
        else:
            with unchanged(*arrays):
                got, total = clipper.clip(arrays)
        for a, w in zip(got, want):
            backend.assert_array(a, arrays[0], dtype, w.shape)
            np.testing.assert_allclose(to_f64(a), w, rtol=rtol, atol=rtol * 1e-3)
        want_total = math.sqrt(sum(float(np.sum(g * g)) for g in inputs))
        assert float(total) == pytest.approx(want_total, rel=max(rtol, 1e-7))
        np.testing.assert_allclose(clipper.max_ema, oracle.m_max, rtol=rtol)
        np.testing.assert_allclose(clipper.norm_m, oracle.m_norm, rtol=rtol)
        np.testing.assert_allclose(clipper.norm_v, oracle.v_norm, rtol=rtol)
        assert clipper.counts == oracle.k
        clipped += clipper.last_clipped
    assert clipper.step == 30 and clipped >= 3  # the spikes were clipped
    assert clipper.counts == [9] * len(SHAPES)  # restarted at 1 after call 22 (gap 11)


def test_default_scale_is_one_and_the_cosine_is_the_references():
    decay = cosine_decay(1.0, 25, 0.3)
    for t in range(1, 60):  # past total_t + 1 as well: the reference's cosine is periodic
        assert stable_spam_scale(t, 25, 0.3) == pytest.approx(decay(t), rel=1e-12, abs=1e-15)
        assert stable_spam_scale(t, None, 0.3) == 1.0


def test_without_resets_and_scale_the_defaults_match():
    oracle = GradOracle(len(SHAPES), 0.7, 0.9, 0.999, 1e-8, None, 0.5, 1000)
    clipper = StableSPAMClip()
    for gs in recorded(12, seed=4):
        want = oracle(gs)
        got, _ = clipper.clip(gs)
        for a, w in zip(got, want):
            np.testing.assert_allclose(a, w, rtol=1e-12)


def _with(gs, value):
    gs = [g.copy() for g in gs]
    gs[1][2] = value
    return gs


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_policies(value):
    seq = recorded(12, seed=5)
    seq[8] = _with(seq[8], value)
    # propagate: the reference's arithmetic, NaN and inf flow into the statistics
    oracle = GradOracle(len(SHAPES), **CONFIG)
    clipper = _clipper()
    with np.errstate(invalid="ignore"):
        for gs in seq:
            want = oracle(gs)
            got, _ = clipper.clip(gs)
            for a, w in zip(got, want):
                np.testing.assert_allclose(a, w, rtol=1e-12)
    np.testing.assert_allclose(clipper.max_ema, oracle.m_max, rtol=1e-12)
    # error and skip: the call is refused or skipped, state and gradients unchanged
    for policy in ("error", "skip"):
        oracle = GradOracle(len(SHAPES), **CONFIG)
        clipper = _clipper(extra=dict(nonfinite=policy))
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
                assert json.loads(clipper_state(clipper))[0] == json.loads(before)[0]
                continue
            want = oracle(gs)
            clipper(gs)
            for a, w in zip(gs, want):
                np.testing.assert_allclose(a, w, rtol=1e-12)


def test_state_dict_round_trip_continues_the_run():
    seq = recorded()
    a = _clipper()
    for gs in seq[:13]:
        a.clip(gs)
    sd = json.loads(json.dumps(a.state_dict()))
    b = StableSPAMClip()
    b.load_state_dict(sd)
    assert b.step == 13 and b.counts == a.counts and b.max_ema == a.max_ema
    assert b.update_proj_gap == 11 and b.total_t == 40
    for gs in seq[13:]:
        ga, _ = a.clip(gs)
        gb, _ = b.clip(gs)
        for x, y in zip(ga, gb):
            np.testing.assert_array_equal(x, y)
    before = clipper_state(b)
    with pytest.raises(ValueError, match=r"StableSPAMClip.load_state_dict: an inconsistent"):
        b.load_state_dict(dict(sd, norm_m=None))
    with pytest.raises(ValueError, match="max_ema holds norms"):
        b.load_state_dict(dict(sd, max_ema=[-1.0] * 4))
    with pytest.raises(ValueError, match="differ in length"):
        b.load_state_dict(dict(sd, counts=[1, 2]))
    with pytest.raises(ValueError, match="counts must be an int >= 1"):
        b.load_state_dict(dict(sd, counts=[0, 1, 1, 1]))
    with pytest.raises(ValueError, match="missing keys"):
        b.load_state_dict({k: v for k, v in sd.items() if k != "counts"})
    assert clipper_state(b) == before


def test_refused_calls_change_nothing():
    seq = recorded(3)
    clipper = _clipper()
    clipper(seq[0])
    before = clipper_state(clipper)
    gs = [g.copy() for g in seq[1]]
    gs[2].flags.writeable = False
    with unchanged(*gs):
        with pytest.raises(ValueError, match=r"StableSPAMClip.__call__: gradient 2 is read-only"):
            clipper(gs)
        with pytest.raises(ValueError, match="3 gradients, but the state holds 4"):
            clipper(gs[:3])
        with pytest.raises(TypeError, match="takes no parameters"):
            clipper.clip(gs, gs)
        with pytest.raises(TypeError, match=r"StableSPAMClip.clip: takes no total_norm"):
            clipper.clip(gs, total_norm=1.0)
    assert clipper_state(clipper) == before
    alias = np.ones(6)
    with unchanged(alias), pytest.raises(ValueError):
        StableSPAMClip()([alias, alias[2:]])  # two gradients sharing memory


def test_empty_list_and_zero_gradients():
    clipper = StableSPAMClip()
    assert float(clipper([])) == 0.0 and clipper.step == 0
    zeros = [np.zeros(3), np.zeros((2, 2))]
    assert float(clipper(zeros)) == 0.0  # the reference leaves a zero-norm gradient as it is
    assert all(not z.any() for z in zeros) and clipper.counts == [1, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(gamma1=1.0), "gamma1"),
        (dict(gamma2=-0.1), "gamma2"),
        (dict(gamma3=math.nan), "gamma3"),
        (dict(eps=-1.0), "eps"),
        (dict(total_t=-1), "total_t"),
        (dict(total_t=2.5), "total_t"),
        (dict(update_proj_gap=-1), "update_proj_gap"),
        (dict(nonfinite="ignore"), "nonfinite"),
    ],
)
def test_bad_arguments_name_the_class(kwargs, match):
    with pytest.raises(
        (TypeError, ValueError), match=rf"fastclip.adaptive.StableSPAMClip: {match}"
    ):
        StableSPAMClip(**kwargs)


def test_repr_names_the_public_path():
    assert StableSPAMClip.__module__ == "fastclip.adaptive"
    assert repr(StableSPAMClip(update_proj_gap=5)).startswith("StableSPAMClip(gamma1=0.7")
    assert Backend.NUMPY.writeable  # the matrix above ran the in-place form on NumPy
