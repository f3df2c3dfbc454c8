"""fastclip.torch.SPAMAdamW and StableSPAMAdamW against float64 NumPy transcriptions
of the reference optimizers, step by step on recorded gradient sequences with
injected spikes (parameters and every state tensor compared after each step):

* SPAM: ``AdamW.step`` of ``galore_torch/SPAM.py``, github.com/TianjinYellow/SPAM-Optimizer
  (commit d169579): momentum reset when ``(total_step + 1) % DeltaT == 0``, the
  masked clip ``g[mask] = sign(g) sqrt(thres v)`` with ``mask = g**2 > thres v``
  after ``grad_accu_steps``, HF-style bias correction, decay after the update,
  ``scale_factor = 1 - CosineDecay(0.99, warmup_steps).get_dr(current_step)``;
* Stable-SPAM: ``StableSPAM.step`` of ``galore_torch/stablespam.py``,
  github.com/TianjinYellow/StableSPAM: AdaClip (EMA of ``max|g|``), AdaGN (EMAs of
  ``||g||`` and ``||g||^2``), the reset that binds the old moments first.

The cosine schedules are read from torch's ``CosineAnnealingLR`` exactly as the
references build it (``CosineDecay``).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _spam_oracles import SpamOracle, StableSpamOracle  # noqa: E402

import fastclip  # noqa: E402
from fastclip.torch import SPAMAdamW, StableSPAMAdamW  # noqa: E402

SHAPES = [(6, 4), (5,), (2, 3, 2)]


def recorded(steps=30, seed=0, nonfinite_at=None, value=math.nan):
    """Seeded gradients; spikes: one element x1e3 at steps 9 and 17, a whole tensor x40
    at step 23; optionally one non-finite element."""
    rng = np.random.default_rng(seed)
    seq = []
    for t in range(steps):
        gs = [rng.normal(size=s) * 0.1 * (i + 1) for i, s in enumerate(SHAPES)]
        if t in (9, 17):
            gs[0][1, 2] *= 1e3
        if t == 23:
            gs[2] *= 40.0
        if t == nonfinite_at:
            gs[1][3] = value
        seq.append(gs)
    return seq


def run(opt_cls, kwargs, seq, dtype=torch.float64, oracle=None, check=None, rtol=1e-12):
    rng = np.random.default_rng(99)
    init = [rng.normal(size=s) for s in SHAPES]
    params = [torch.nn.Parameter(torch.tensor(x, dtype=dtype)) for x in init]
    opt = opt_cls(params, **kwargs)
    ref_p = [x.copy() for x in init]
    for gs in seq:
        for p, g in zip(params, gs):
            p.grad = None if g is None else torch.tensor(g, dtype=dtype)
        opt.step()
        if oracle is not None:
            seen = [
                None if g is None else torch.tensor(g, dtype=dtype).double().numpy() for g in gs
            ]
            with np.errstate(invalid="ignore", over="ignore"):
                oracle.step(ref_p, seen)
            for i, p in enumerate(params):
                if gs[i] is None and p not in opt.state:
                    continue
                # float32 runs round every step: entries near 0 are compared on the
                # tensor's scale (cancellation), the others relatively
                close(p.detach().double().numpy(), ref_p[i], rtol)
                if check is not None:
                    check(opt.state[p], oracle, i, rtol)
    return opt, params


def close(got, want, rtol):
    finite = np.isfinite(want)
    scale = float(np.abs(want[finite]).max()) if finite.any() else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale * 1e-2)


def spam_states(st, oracle, i, rtol):
    close(st["exp_avg"].double().numpy(), oracle.m[i], rtol)
    close(st["exp_avg_sq"].double().numpy(), oracle.v[i], rtol)
    assert st["step"] == oracle.k[i]


SPAM_KW = dict(
    lr=0.01,
    betas=(0.9, 0.99),
    eps=1e-6,
    weight_decay=0.1,
    threshold=50.0,
    delta_t=10,
    warmup_steps=4,
    grad_accu_steps=3,
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("correct_bias", [True, False])
def test_spam_matches_the_reference(dtype, correct_bias):
    kw = dict(SPAM_KW, correct_bias=correct_bias)
    oracle = SpamOracle(
        SHAPES, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"], 50.0, 10, 4, 3, correct_bias
    )
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    opt, _ = run(SPAMAdamW, kw, recorded(), dtype, oracle, spam_states, rtol)
    assert opt.total_step == 30 and opt.current_step == oracle.current_step


@pytest.mark.parametrize("cls", ["spam", "stable_spam"])
def test_parameters_without_gradients_keep_their_own_step_counts(cls):
    """A parameter without a gradient for 4 steps: its bias corrections lag the
    others' (per-tensor step sizes in one multi-tensor update)."""
    seq = recorded(20)
    for gs in seq[:4]:
        gs[1] = None
    if cls == "spam":
        oracle = SpamOracle(SHAPES, 0.01, (0.9, 0.99), 1e-6, 0.1, 50.0, 10, 4, 3)
        run(SPAMAdamW, SPAM_KW, seq, oracle=oracle, check=spam_states)
        assert oracle.k == [20, 16, 20]
    else:
        oracle = StableSpamOracle(
            SHAPES, 0.01, (0.9, 0.999), 1e-8, 0.0, False, 0.7, 0.9, 0.999, None, 0.5, 7
        )
        run(
            StableSPAMAdamW,
            dict(lr=0.01, update_proj_gap=7),
            seq,
            oracle=oracle,
            check=stable_states,
        )


def test_spam_defaults_are_the_references():
    opt = SPAMAdamW([torch.nn.Parameter(torch.zeros(1))])
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["correct_bias"]) == (
        1e-3,
        (0.9, 0.999),
        1e-6,
        0.0,
        True,
    )
    assert (opt.threshold, opt.delta_t, opt.warmup_steps, opt.grad_accu_steps) == (
        5000,
        500,
        150,
        20,
    )
    assert opt.current_step == 151


def stable_states(st, oracle, i, rtol):
    spam_states(st, oracle, i, rtol)
    for key, ref in (
        ("m_norm_t", oracle.m_norm),
        ("v_norm_t", oracle.v_norm),
        ("m_max_t", oracle.m_max),
    ):
        assert float(st[key]) == pytest.approx(float(ref[i]), rel=rtol * 10, abs=1e-300)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "amsgrad, total_t, gamma1", [(False, None, 0.7), (True, 20, -1), (False, 12, 0.85)]
)
def test_stable_spam_matches_the_reference(dtype, amsgrad, total_t, gamma1):
    kw = dict(
        lr=0.01,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.05,
        amsgrad=amsgrad,
        gamma1=gamma1,
        gamma2=0.9,
        gamma3=0.999,
        total_t=total_t,
        eta_min=0.5,
        update_proj_gap=7,
    )
    oracle = StableSpamOracle(
        SHAPES, 0.01, (0.9, 0.999), 1e-8, 0.05, amsgrad, gamma1, 0.9, 0.999, total_t, 0.5, 7
    )
    rtol = 1e-11 if dtype == torch.float64 else 5e-5
    opt, _ = run(StableSPAMAdamW, kw, recorded(), dtype, oracle, stable_states, rtol)
    assert opt.total_steps == 30


def test_stable_spam_defaults_are_the_references():
    opt = StableSPAMAdamW([torch.nn.Parameter(torch.zeros(1))])
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["amsgrad"]) == (
        1e-3,
        (0.9, 0.999),
        1e-8,
        0.0,
        False,
    )
    assert (opt.gamma1, opt.gamma2, opt.gamma3, opt.total_t, opt.eta_min, opt.update_proj_gap) == (
        0.7,
        0.9,
        0.999,
        None,
        0.5,
        1000,
    )


CASES = [
    (SPAMAdamW, SPAM_KW, lambda: SpamOracle(SHAPES, 0.01, (0.9, 0.99), 1e-6, 0.1, 50.0, 10, 4, 3)),
    (
        StableSPAMAdamW,
        dict(lr=0.01, update_proj_gap=7),
        lambda: StableSpamOracle(
            SHAPES, 0.01, (0.9, 0.999), 1e-8, 0.0, False, 0.7, 0.9, 0.999, None, 0.5, 7
        ),
    ),
]


def snapshot(opt, params):
    return copy.deepcopy(
        (opt.state_dict(), [p.detach().clone() for p in params], [p.grad.clone() for p in params])
    )


def same(a, b):
    sa, pa, ga = a
    sb, pb, gb = b
    assert sa["counters"] == sb["counters"]
    for x, y in zip(pa + ga, pb + gb):
        assert torch.equal(x, y) or (x.isnan() == y.isnan()).all()
    for k in sa["state"]:
        for key, x in sa["state"][k].items():
            y = sb["state"][k][key]
            assert (x == y) if not torch.is_tensor(x) else torch.equal(x, y)


@pytest.mark.parametrize("cls, kw, make", CASES, ids=["spam", "stable_spam"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_policies(cls, kw, make, value):
    seq = recorded(16, nonfinite_at=12, value=value)
    # propagate: the reference's arithmetic, NaN and inf included
    run(cls, kw, seq, oracle=make(), check=None)
    for policy in ("error", "skip"):
        oracle = make()
        rng = np.random.default_rng(99)
        init = [rng.normal(size=s) for s in SHAPES]
        params = [torch.nn.Parameter(torch.tensor(x)) for x in init]
        opt = cls(params, **kw, nonfinite=policy)
        ref_p = [x.copy() for x in init]
        for t, gs in enumerate(seq):
            for p, g in zip(params, gs):
                p.grad = torch.tensor(g)
            if t == 12:
                before = snapshot(opt, params)
                if policy == "error":
                    with pytest.raises(fastclip.NonFiniteNormError, match=cls.__name__):
                        opt.step()
                else:
                    opt.step()
                    assert opt.last_step_skipped
                same(before, snapshot(opt, params))
                continue
            opt.step()
            assert not opt.last_step_skipped
            oracle.step(ref_p, gs)  # the skipped step never happened
            for p, r in zip(params, ref_p):
                np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-12)


@pytest.mark.parametrize("cls, kw, make", CASES, ids=["spam", "stable_spam"])
def test_state_dict_round_trip_continues_the_run(cls, kw, make):
    seq = recorded()
    a, pa = run(cls, kw, seq[:13])
    sd = copy.deepcopy(a.state_dict())
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    b = cls(pb, **kw)
    b.load_state_dict(sd)
    for gs in seq[13:]:
        for p, q, g in zip(pa, pb, gs):
            p.grad, q.grad = torch.tensor(g), torch.tensor(g)
        a.step()
        b.step()
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    before = copy.deepcopy(b.state_dict())
    bad = dict(sd, counters={"nope": 1})
    with pytest.raises(ValueError, match=rf"fastclip.torch.{cls.__name__}.load_state_dict"):
        b.load_state_dict(bad)
    assert b.state_dict()["counters"] == before["counters"]


@pytest.mark.parametrize("cls", [SPAMAdamW, StableSPAMAdamW])
def test_bad_gradients_and_arguments_change_nothing(cls):
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    opt = cls(params, lr=0.1)
    params[0].grad = torch.ones(3)
    params[1].grad = torch.ones(2, 2).to_sparse()
    with pytest.raises(RuntimeError, match=rf"fastclip.torch.{cls.__name__}.step: sparse"):
        opt.step()
    assert torch.equal(params[0], torch.ones(3)) and not opt.state
    params[1].grad = None
    params.append(torch.nn.Parameter(torch.ones(2, dtype=torch.complex64)))
    params[2].grad = torch.ones(2, dtype=torch.complex64)
    opt = cls(params, lr=0.1)
    with pytest.raises(TypeError, match="real floating"):
        opt.step()
    assert torch.equal(params[0], torch.ones(3)) and not opt.state
    for bad, match in [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(eps=math.nan), "eps"),
        (dict(nonfinite="ignore"), "nonfinite"),
    ]:
        with pytest.raises(
            (TypeError, ValueError), match=rf"fastclip.torch.{cls.__name__}: {match}"
        ):
            cls(params, **bad)


def test_spam_leaves_the_gradients_as_they_were():
    seq = recorded(12)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    opt = SPAMAdamW(params, **SPAM_KW)
    for gs in seq:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step()
        for p, g in zip(params, gs):
            np.testing.assert_array_equal(p.grad.numpy(), g)
