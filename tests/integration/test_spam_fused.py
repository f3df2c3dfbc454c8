"""The fused route of SPAMAdamW and StableSPAMAdamW (one kernel pass per dtype)
against the float64 transcriptions of the reference optimizers
(``_spam_oracles.py``, sources in ``test_spam.py``) and against the ``_foreach``
route, on recorded gradient sequences with spikes, resets, warm-up, weight
decay, several groups, float32 / float64 / bfloat16 and strided parameters.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _spam_oracles import SpamOracle, StableSpamOracle, round_oracle  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastclip  # noqa: E402
from fastclip.torch import SPAMAdamW, StableSPAMAdamW  # noqa: E402

SHAPES = [(6, 4), (5,), (2, 3, 2), (3, 7)]


def recorded(shapes=SHAPES, steps=32, seed=0, nonfinite_at=None, value=math.nan):
    """Seeded gradients: one element x1e3 at steps 9 and 17, a whole tensor x40 at
    step 23 (spikes), optionally one non-finite element."""
    rng = np.random.default_rng(seed)
    seq = []
    for t in range(steps):
        gs = [rng.normal(size=s) * 0.1 * (i + 1) for i, s in enumerate(shapes)]
        if t in (9, 17):
            gs[0].flat[5] *= 1e3
        if t == 23:
            gs[-1] *= 40.0
        if t == nonfinite_at:
            gs[1].flat[3] = value
        seq.append(gs)
    return seq


def make_params(shapes, dtype, strided=False, seed=99):
    """Parameters from seeded values; ``strided``: transposed (non-contiguous) leaves."""
    rng = np.random.default_rng(seed)
    init = [rng.normal(size=s) for s in shapes]
    params = []
    for x in init:
        t = torch.tensor(x, dtype=dtype)
        if strided and t.dim() == 2:
            t = torch.tensor(x.T.copy(), dtype=dtype).t()  # same values, transposed strides
            assert not t.is_contiguous()
        params.append(torch.nn.Parameter(t))
    return params, [p.detach().double().numpy().copy() for p in params]


def close(got, want, rtol, cancel=1e-2):
    """Relative to ``rtol``; entries near 0 (cancellation) to ``rtol * cancel`` of
    the tensor's largest magnitude."""
    finite = np.isfinite(want)
    scale = float(np.abs(want[finite]).max()) if finite.any() else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale * cancel)


SPAM_KW = dict(
    lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1,
    threshold=50.0, delta_t=10, warmup_steps=4, grad_accu_steps=3,
)  # fmt: skip
STABLE_KW = dict(
    lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, amsgrad=False,
    gamma1=0.7, gamma2=0.9, gamma3=0.999, total_t=20, eta_min=0.5, update_proj_gap=7,
)  # fmt: skip


def spam_oracle(shapes, kw):
    return SpamOracle(
        shapes, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"], kw["threshold"],
        kw["delta_t"], kw["warmup_steps"], kw["grad_accu_steps"], kw.get("correct_bias", True),
    )  # fmt: skip


def stable_oracle(shapes, kw):
    return StableSpamOracle(
        shapes, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"], kw["amsgrad"],
        kw["gamma1"], kw["gamma2"], kw["gamma3"], kw["total_t"], kw["eta_min"],
        kw["update_proj_gap"],
    )  # fmt: skip


def check_states(opt, params, oracle, rtol, stable, cancel=1e-2):
    for i, p in enumerate(params):
        st_ = opt.state[p]
        close(st_["exp_avg"].double().numpy(), oracle.m[i], rtol, cancel)
        close(st_["exp_avg_sq"].double().numpy(), oracle.v[i], rtol, cancel)
        assert st_["step"] == oracle.k[i]
        if stable:
            for key, ref in (("m_norm_t", oracle.m_norm), ("m_max_t", oracle.m_max)):
                assert float(st_[key]) == pytest.approx(
                    float(ref[i]), rel=rtol * 10, abs=1e-300, nan_ok=True
                )
            if "max_exp_avg_sq" in st_:
                close(st_["max_exp_avg_sq"].double().numpy(), oracle.vmax[i], rtol, cancel)


def drive(cls, kw, seq, dtype, oracle=None, rtol=None, strided=False, fused=True, stable=False):
    """Step ``cls`` on ``seq``; after each step compare params and state with ``oracle``."""
    params, ref = make_params(SHAPES, dtype, strided)
    opt = cls(params, **kw, fused=fused)
    for gs in seq:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=dtype)
            if strided and p.dim() == 2:
                p.grad = torch.tensor(g.T.copy(), dtype=dtype).t()
        opt.step()
        assert opt.last_step_route == ("cpu" if fused is not False else "foreach")
        if oracle is not None:
            seen = [torch.tensor(g, dtype=dtype).double().numpy() for g in gs]
            with np.errstate(invalid="ignore", over="ignore"):
                oracle.step(ref, seen)
            for p, r in zip(params, ref):
                close(p.detach().double().numpy(), r, rtol)
            check_states(opt, params, oracle, rtol, stable)
    return opt, params


TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize(
    "extra",
    [{}, dict(correct_bias=False), dict(delta_t=5, grad_accu_steps=0, warmup_steps=3)],
    ids=["default", "no-bias-correction", "small-delta-t"],
)
def test_fused_spam_matches_the_reference(dtype, strided, extra):
    kw = dict(SPAM_KW, **extra)
    oracle = spam_oracle(SHAPES, kw)
    opt, _ = drive(SPAMAdamW, kw, recorded(), dtype, oracle, TOL[dtype], strided)
    assert (opt.total_step, opt.current_step) == (oracle.total_step, oracle.current_step)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize(
    "extra",
    [{}, dict(amsgrad=True, gamma1=-1), dict(total_t=None, weight_decay=0.0, update_proj_gap=0)],
    ids=["default", "amsgrad", "no-schedule"],
)
def test_fused_stable_spam_matches_the_reference(dtype, strided, extra):
    kw = dict(STABLE_KW, **extra)
    oracle = stable_oracle(SHAPES, kw)
    rtol = 1e-11 if dtype == torch.float64 else 5e-5
    drive(StableSPAMAdamW, kw, recorded(), dtype, oracle, rtol, strided, stable=True)


@pytest.mark.parametrize("cls", ["spam", "stable_spam"])
def test_bfloat16_matches_the_reference_rounded_as_stored(cls):
    """bfloat16 storage: the oracle rounds parameters and state to bfloat16 after
    each step, as the fused route stores them (float32 arithmetic in between).
    Differences are a few bfloat16 roundings: 2% relative, and entries near 0
    (cancellation of rounded operands) to 1/4 of the tensor's largest magnitude's ulp."""
    seq = recorded(steps=16)
    bf16 = lambda a: torch.tensor(a).to(torch.bfloat16).double().numpy()  # noqa: E731
    if cls == "spam":
        opt_cls, kw, oracle, stable = SPAMAdamW, SPAM_KW, spam_oracle(SHAPES, SPAM_KW), False
    else:
        kw = STABLE_KW
        opt_cls, oracle, stable = StableSPAMAdamW, stable_oracle(SHAPES, kw), True
    params, ref = make_params(SHAPES, torch.bfloat16)
    opt = opt_cls(params, **kw)
    for gs in seq:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=torch.bfloat16)
        opt.step()
        seen = [torch.tensor(g, dtype=torch.bfloat16).double().numpy() for g in gs]
        oracle.step(ref, seen)
        round_oracle(oracle, ref, bf16)
        for p, r in zip(params, ref):
            close(p.detach().double().numpy(), r, 2e-2, 0.1)
        check_states(opt, params, oracle, 2e-2, stable, 0.1)
        assert opt.last_step_route == "cpu"


@pytest.mark.parametrize("cls", ["spam", "stable_spam"])
def test_several_groups_and_dtypes_in_one_step(cls, small_chunks):
    """Two groups (different lr and weight decay), float32 and float64 tensors
    mixed in each (one launch per dtype), multi-chunk parallel kernels: each
    group against its own oracle (the optimizers' counters advance together)."""
    shapes_a, shapes_b = SHAPES[:2], SHAPES[2:]
    seq = recorded()
    base = SPAM_KW if cls == "spam" else STABLE_KW
    kw_a, kw_b = dict(base, lr=0.02, weight_decay=0.0), dict(base, lr=0.005, weight_decay=0.2)
    make = spam_oracle if cls == "spam" else stable_oracle
    oracles = [make(shapes_a, kw_a), make(shapes_b, kw_b)]
    pa, ra = make_params(shapes_a, torch.float64)
    pb, rb = make_params(shapes_b, torch.float64, seed=5)
    pa[1].data = pa[1].data.float()
    pb[0].data = pb[0].data.float()
    opt_cls = SPAMAdamW if cls == "spam" else StableSPAMAdamW
    shared = {k: v for k, v in base.items() if k not in ("lr", "weight_decay")}
    groups = [
        dict(params=pa, lr=0.02, weight_decay=0.0),
        dict(params=pb, lr=0.005, weight_decay=0.2),
    ]
    opt = opt_cls(groups, **shared)
    for gs in seq:
        for p, g in zip(pa + pb, gs):
            p.grad = torch.tensor(g, dtype=p.dtype)
        opt.step()
        assert opt.last_step_route == "cpu"
        for params, ref, oracle, off in ((pa, ra, oracles[0], 0), (pb, rb, oracles[1], 2)):
            seen = [
                torch.tensor(g, dtype=p.dtype).double().numpy() for p, g in zip(params, gs[off:])
            ]
            oracle.step(ref, seen)
            for p, r in zip(params, ref):
                close(p.detach().double().numpy(), r, TOL[p.dtype])


@pytest.mark.parametrize("cls, kw", [(SPAMAdamW, SPAM_KW), (StableSPAMAdamW, STABLE_KW)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_and_foreach_routes_agree_over_32_steps(cls, kw, dtype):
    seq = recorded(steps=32)
    fused, pf = drive(cls, kw, seq, dtype, fused=True)
    each, pe = drive(cls, kw, seq, dtype, fused=False)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(pf, pe):
        close(a.detach().double().numpy(), b.detach().double().numpy(), rtol)
    sf, se = fused.state_dict(), each.state_dict()
    assert sf["counters"] == se["counters"] and sf["param_groups"] == se["param_groups"]
    assert sf["state"].keys() == se["state"].keys()
    for k in sf["state"]:
        assert sf["state"][k].keys() == se["state"][k].keys()
        for key, x in sf["state"][k].items():
            y = se["state"][k][key]
            if torch.is_tensor(x):
                assert (x.dtype, x.shape) == (y.dtype, y.shape)
                close(x.double().numpy().reshape(-1), y.double().numpy().reshape(-1), rtol * 10)
            else:
                assert x == y


@pytest.mark.parametrize("cls, kw", [(SPAMAdamW, SPAM_KW), (StableSPAMAdamW, STABLE_KW)])
@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_a_checkpoint_of_one_route_continues_in_the_other(cls, kw, first, second):
    """13 steps in one route, the state dict loaded into the other, 19 more steps:
    the same trajectory as 32 steps in the second route alone (float64: to 1e-12)."""
    seq = recorded(steps=32)
    a, pa = drive(cls, kw, seq[:13], torch.float64, fused=first)
    sd = copy.deepcopy(a.state_dict())
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    b = cls(pb, **kw, fused=second)
    b.load_state_dict(sd)
    for gs in seq[13:]:
        for p, g in zip(pb, gs):
            p.grad = torch.tensor(g)
        b.step()
    _, want = drive(cls, kw, seq, torch.float64, fused=second)
    for p, q in zip(pb, want):
        close(p.detach().numpy(), q.detach().numpy(), 1e-12)


def snapshot(opt, params):
    return copy.deepcopy(
        (opt.state_dict(), [p.detach().clone() for p in params], [p.grad.clone() for p in params])
    )


def assert_same(a, b):
    (sa, pa, ga), (sb, pb, gb) = a, b
    assert sa["counters"] == sb["counters"] and sa["state"].keys() == sb["state"].keys()
    for x, y in zip(pa + ga, pb + gb):
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())
    for k in sa["state"]:
        for key, x in sa["state"][k].items():
            y = sb["state"][k][key]
            assert torch.equal(x, y) if torch.is_tensor(x) else x == y


@pytest.mark.parametrize("cls, kw, make", [
    (SPAMAdamW, SPAM_KW, spam_oracle), (StableSPAMAdamW, STABLE_KW, stable_oracle),
], ids=["spam", "stable_spam"])  # fmt: skip
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonfinite_policies_on_the_fused_route(cls, kw, make, value, dtype):
    seq = recorded(steps=16, nonfinite_at=12, value=value)
    # propagate: the reference's arithmetic, NaN and inf included
    drive(cls, kw, seq, dtype, make(SHAPES, kw), TOL[dtype] * 3, stable=cls is StableSPAMAdamW)
    for policy in ("error", "skip"):
        oracle = make(SHAPES, kw)
        params, ref = make_params(SHAPES, dtype)
        opt = cls(params, **kw, nonfinite=policy, fused=True)
        for t, gs in enumerate(seq):
            for p, g in zip(params, gs):
                p.grad = torch.tensor(g, dtype=dtype)
            if t == 12:
                before = snapshot(opt, params)
                if policy == "error":
                    with pytest.raises(fastclip.NonFiniteNormError, match=cls.__name__):
                        opt.step()
                else:
                    opt.step()
                    assert opt.last_step_skipped
                assert_same(before, snapshot(opt, params))
                continue
            opt.step()
            assert not opt.last_step_skipped
            oracle.step(ref, [torch.tensor(g, dtype=dtype).double().numpy() for g in gs])
            for p, r in zip(params, ref):
                close(p.detach().double().numpy(), r, TOL[dtype] * 3)


@pytest.mark.parametrize("cls", [SPAMAdamW, StableSPAMAdamW])
def test_bad_input_changes_nothing(cls):
    # two parameters sharing memory: refused by the fused route before any write
    base = torch.arange(10.0)
    params = [torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])]
    opt = cls(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(base, torch.arange(10.0)) and not opt.state
    # fused=True with a parameter no fused kernel takes: named, nothing written
    ok = torch.nn.Parameter(torch.ones(3))
    mixed = torch.nn.Parameter(torch.ones(2))
    mixed.grad_dtype = None  # torch allows a gradient of another dtype once asked
    ok.grad, mixed.grad = torch.ones(3), torch.ones(2, dtype=torch.float64)
    opt = cls([ok, mixed], lr=0.1, fused=True)
    with pytest.raises(TypeError, match=rf"{cls.__name__}.step: fused=True, but parameter 1 is"):
        opt.step()
    fresh = cls([ok, mixed], lr=0.1).state_dict()["counters"]
    assert torch.equal(ok, torch.ones(3)) and not opt.state
    assert opt.state_dict()["counters"] == fresh
    # fused=None takes the documented foreach route for it, and says so
    opt = cls([ok, mixed], lr=0.1)
    opt.step()
    assert opt.last_step_route == "foreach"
    with pytest.raises(TypeError, match=rf"fastclip.torch.{cls.__name__}: fused must be"):
        cls([ok], fused="yes")


@given(
    seed=st.integers(0, 2**16),
    lr=st.floats(1e-4, 0.1),
    threshold=st.sampled_from([0.0, 2.0, 50.0]),
    delta_t=st.integers(2, 6),
    accu=st.integers(0, 3),
)
def test_fused_spam_property_matches_the_reference(seed, lr, threshold, delta_t, accu):
    shapes = [(5,), (3, 2)]
    kw = dict(SPAM_KW, lr=lr, threshold=threshold, delta_t=delta_t, grad_accu_steps=accu)
    rng = np.random.default_rng(seed)
    params = [torch.nn.Parameter(torch.tensor(rng.normal(size=s))) for s in shapes]
    ref = [p.detach().numpy().copy() for p in params]
    opt, oracle = SPAMAdamW(params, **kw, fused=True), spam_oracle(shapes, kw)
    for _ in range(8):
        gs = [rng.normal(size=s) * rng.choice([0.1, 1.0, 100.0]) for s in shapes]
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step()
        oracle.step(ref, gs)
    for p, r in zip(params, ref):
        close(p.detach().numpy(), r, 1e-11)
