"""Fused clip-and-step optimizers against torch.optim and float64 transcriptions.

This file owns fastclip.optim (adamw_step_, sgd_step_) and fastclip.torch's FusedAdamW,
FusedSGD and ClippedOptimizer; their refusals and argument checks are in
test_safety_optim.py, their GPU driver in tests/gpu/.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import reference
from hypothesis import given
from hypothesis import strategies as st

import fastclip
from fastclip.optim import adamw_step_, sgd_step_

torch = pytest.importorskip("torch")

from fastclip.adaptive import AutoClip, GlobalNormClipper, ZClip  # noqa: E402
from fastclip.torch import ClippedOptimizer, FusedAdamW, FusedSGD  # noqa: E402

# ----------------------------------------------------------- float64 oracles


def _coef(grads, max_norm, eps=1e-6):
    """The clip coefficient and global norm of ``grads`` (float64 oracle)."""
    total = float(reference.global_norm([np.asarray(g, np.float64) for g in grads]))
    return float(reference.coefficient(total, max_norm, eps)), total


SHAPES = [(17,), (5, 9), (3, 4, 5), (1,), (0,), (70_000,)]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_adamw_step_against_float64_formulas(amsgrad, dtype, lib, small_chunks) -> None:
    rng = np.random.default_rng(0)
    P = [rng.normal(size=s) for s in SHAPES]
    M = [np.zeros(s) for s in SHAPES]
    V = [np.zeros(s) for s in SHAPES]
    X = [np.zeros(s) for s in SHAPES] if amsgrad else None
    conv = (lambda a: np.array(a, dtype)) if lib == "numpy" else (
        lambda a: torch.tensor(a, dtype=getattr(torch, dtype)))  # fmt: skip
    back = (lambda a: np.asarray(a, np.float64)) if lib == "numpy" else (
        lambda t: t.double().numpy())  # fmt: skip
    p, m, v = [conv(a) for a in P], [conv(a) for a in M], [conv(a) for a in V]
    x = [conv(a) for a in X] if amsgrad else None
    rtol = 1e-12 if dtype == "float64" else 2e-5
    for step in range(1, 6):
        G = [rng.normal(size=s) * 3 for s in SHAPES]
        g = [conv(a) for a in G]
        coef, total = _coef([back(a) for a in g], 2.0)
        norm = adamw_step_(
            p, g, m, v, step=step, lr=1e-2, betas=(0.8, 0.99), eps=1e-6,
            weight_decay=0.1, max_exp_avg_sqs=x, max_norm=2.0,
        )  # fmt: skip
        assert float(norm) == pytest.approx(total, rel=1e-6 if dtype == "float32" else 1e-13)
        for i in range(len(SHAPES)):
            P[i], M[i], V[i], xi = reference.adamw_step(
                P[i], back(g[i]), M[i], V[i], X[i] if X else None, step,
                1e-2, 0.8, 0.99, 1e-6, 0.1, coef,
            )  # fmt: skip
            if X:
                X[i] = xi
            np.testing.assert_allclose(back(p[i]), P[i], rtol=rtol, atol=rtol * 1e-3)
            np.testing.assert_allclose(back(m[i]), M[i], rtol=rtol, atol=rtol * 1e-3)
            np.testing.assert_allclose(back(v[i]), V[i], rtol=rtol, atol=rtol * 1e-3)


@given(
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.3]),
    weight_decay=st.sampled_from([0.0, 1e-2]),
    nesterov=st.booleans(),
    maximize=st.booleans(),
    max_norm=st.one_of(st.none(), st.floats(0.01, 100.0)),
    seed=st.integers(0, 2**16),
)
def test_sgd_step_property(momentum, dampening, weight_decay, nesterov, maximize, max_norm, seed):
    if nesterov and (momentum == 0 or dampening != 0):
        return
    rng = np.random.default_rng(seed)
    shapes = [(7,), (3, 4), (0,)]
    P = [rng.normal(size=s) for s in shapes]
    p = [a.copy() for a in P]
    B = [None] * len(shapes)
    b = [np.empty(s) for s in shapes] if momentum else None
    for step in range(3):
        g = [rng.normal(size=s) for s in shapes]
        coef = 1.0 if max_norm is None else _coef(g, max_norm)[0]
        sgd_step_(
            p, g, b, lr=0.1, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, first_step=step == 0, max_norm=max_norm,
        )  # fmt: skip
        for i in range(len(shapes)):
            P[i], B[i] = reference.sgd_step(
                P[i], g[i], B[i], 0.1, momentum, dampening, weight_decay, nesterov,
                step == 0, -coef if maximize else coef,
            )  # fmt: skip
            np.testing.assert_allclose(p[i], P[i], rtol=1e-13, atol=1e-15)


# --------------------------------------------------- parity with torch.optim


def _mlp(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 5),
    ).to(dtype)  # fmt: skip


def _train_pair(make_ref, make_ours, steps=100, max_norm=0.5, clip_ref=True, groups=False):
    torch.manual_seed(1)
    X, Y = torch.randn(256, 20), torch.randn(256, 5)
    a = _mlp()
    b = copy.deepcopy(a)

    def params(m):
        if not groups:
            return m.parameters()
        w = [p for n, p in m.named_parameters() if n.endswith("weight")]
        bias = [p for n, p in m.named_parameters() if n.endswith("bias")]
        return [{"params": w}, {"params": bias, "weight_decay": 0.0, "lr": 3e-3}]

    oa, ob = make_ref(params(a)), make_ours(params(b))
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,))
        for model, opt, ref in ((a, oa, True), (b, ob, False)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X[idx]), Y[idx]) * 10
            loss.backward()
            if ref and clip_ref:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
    return a, b, oa, ob


def _assert_params_close(a, b, rtol=1e-6):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        err = float((pa.detach() - pb.detach()).norm() / pa.detach().norm())
        assert err <= rtol, (name, err)


ADAMW_CASES = [
    dict(lr=1e-3, weight_decay=0.1),
    dict(lr=2e-3, betas=(0.8, 0.95), eps=1e-6, amsgrad=True),
    dict(lr=1e-3, betas=(0.3, 0.9), maximize=True),  # the lerp's large-weight branch
]


@pytest.mark.parametrize("kw", ADAMW_CASES, ids=str)
@pytest.mark.parametrize("groups", [False, True])
def test_fused_adamw_matches_torch_over_100_steps(kw, groups) -> None:
    a, b, oa, ob = _train_pair(
        lambda p: torch.optim.AdamW(p, **kw), lambda p: FusedAdamW(p, **kw, max_norm=0.5),
        groups=groups,
    )  # fmt: skip
    _assert_params_close(a, b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        sa, sb = oa.state[pa], ob.state[pb]
        assert float(sa["step"]) == float(sb["step"]) == 100
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=1e-4, atol=1e-6)


SGD_CASES = [
    dict(lr=1e-2),
    dict(lr=1e-2, momentum=0.9, weight_decay=1e-3, dampening=0.1),
    dict(lr=1e-2, momentum=0.9, nesterov=True),
    dict(lr=1e-2, weight_decay=1e-2, maximize=True),
]


@pytest.mark.parametrize("kw", SGD_CASES, ids=str)
def test_fused_sgd_matches_torch_over_100_steps(kw) -> None:
    a, b, _oa, _ob = _train_pair(
        lambda p: torch.optim.SGD(p, **kw), lambda p: FusedSGD(p, **kw, max_norm=0.5)
    )
    _assert_params_close(a, b)


def test_fused_sgd_without_clip_is_bit_exact() -> None:
    kw = dict(lr=1e-2, momentum=0.9, weight_decay=1e-3, dampening=0.1)
    a, b, _, _ = _train_pair(
        lambda p: torch.optim.SGD(p, **kw), lambda p: FusedSGD(p, **kw), clip_ref=False
    )
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_fused_adamw_state_dict_interchangeable_with_torch() -> None:
    kw = dict(lr=1e-3, weight_decay=0.1)
    a, b, oa, ob = _train_pair(
        lambda p: torch.optim.AdamW(p, **kw), lambda p: FusedAdamW(p, **kw, max_norm=0.5),
        steps=10,
    )  # fmt: skip
    # torch's state into ours, ours into torch: both keep training identically
    c = copy.deepcopy(a)
    oc = FusedAdamW(c.parameters(), **kw, max_norm=0.5)
    oc.load_state_dict(oa.state_dict())
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    od = torch.optim.AdamW(b.parameters(), **kw)
    od.load_state_dict(torch.load(buf, weights_only=True))
    for pc, pa in zip(c.parameters(), a.parameters()):
        assert float(oc.state[pc]["step"]) == float(oa.state[pa]["step"]) == 10
        assert torch.equal(oc.state[pc]["exp_avg"], oa.state[pa]["exp_avg"])


def test_fused_nonfinite_policies() -> None:
    for policy in ("skip", "error", "propagate"):
        w = torch.nn.Parameter(torch.ones(3))
        opt = FusedAdamW([w], lr=0.1, max_norm=1.0, nonfinite=policy)
        w.grad = torch.tensor([1.0, 2.0, 3.0])
        opt.step()
        before = w.detach().clone()
        state = copy.deepcopy(opt.state_dict())
        w.grad = torch.tensor([1.0, math.nan, 3.0])
        if policy == "error":
            with pytest.raises(fastclip.NonFiniteNormError):
                opt.step()
        else:
            opt.step()
        if policy == "propagate":
            assert torch.isnan(w).all()
            continue
        assert torch.equal(w.detach(), before)
        assert opt.last_step_skipped == (policy == "skip")
        s0, s1 = state["state"][0], opt.state_dict()["state"][0]
        assert float(s0["step"]) == float(s1["step"]) == 1
        assert torch.equal(s0["exp_avg"], s1["exp_avg"])


def test_mixed_dtypes_share_one_norm_bfloat16_included() -> None:
    """float32, bfloat16 and float64 parameters in one optimizer: one global norm,
    each step equal to the float64 formulas applied to the stored state (bfloat16
    to its half-ulp rounding, since it is computed in float32 and rounded once)."""
    torch.manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float64]
    ws = [torch.nn.Parameter(torch.randn(300).to(d)) for d in dtypes]
    opt = FusedAdamW(ws, lr=1e-2, weight_decay=0.1, max_norm=1.0)
    d64 = lambda t: t.detach().double().numpy().copy()  # noqa: E731
    for step in range(1, 6):
        for w in ws:
            w.grad = (torch.randn(300) * 0.3).to(w.dtype)
        before = [(d64(w), d64(w.grad)) for w in ws]
        states = [(d64(opt.state[w]["exp_avg"]), d64(opt.state[w]["exp_avg_sq"]))
                  if opt.state[w] else (np.zeros(300), np.zeros(300)) for w in ws]  # fmt: skip
        coef, total = _coef([g for _, g in before], 1.0)
        opt.step()
        assert float(opt.last_total_norm) == pytest.approx(total, rel=1e-6)
        for w, (p, g), (m, v) in zip(ws, before, states):
            want = reference.adamw_step(p, g, m, v, None, step, 1e-2, 0.9, 0.999, 1e-8, 0.1, coef)[
                0
            ]
            rtol = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float64: 1e-13}[w.dtype]
            np.testing.assert_allclose(d64(w), want, rtol=rtol, atol=1e-7)


# --------------------------------------------------------- ClippedOptimizer


def test_clipped_optimizer_matches_manual_clip_and_step() -> None:
    a, b, _oa, ob = _train_pair(
        lambda p: torch.optim.AdamW(p, lr=1e-3),
        lambda p: ClippedOptimizer(torch.optim.AdamW(p, lr=1e-3), GlobalNormClipper(0.5)),
        steps=30,
    )  # fmt: skip
    _assert_params_close(a, b)
    sd = ob.state_dict()
    assert set(sd) == {"state", "param_groups", "fastclip_clipper"}
    assert sd["fastclip_clipper"]["step"] == 30


def test_clipped_optimizer_with_autoclip_matches_reference_loop() -> None:
    torch.manual_seed(0)
    a = _mlp()
    b = copy.deepcopy(a)
    oa = torch.optim.SGD(a.parameters(), lr=0.05)
    ob = ClippedOptimizer(torch.optim.SGD(b.parameters(), lr=0.05), AutoClip(percentile=10))
    X, Y = torch.randn(64, 20), torch.randn(64, 5)
    history: list[float] = []
    for _ in range(25):
        for model, opt, ref in ((a, oa, True), (b, ob, False)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X), Y).backward()
            if ref:
                grads = [p.grad for p in model.parameters()]
                history.append(
                    float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
                )
                torch.nn.utils.clip_grad_norm_(
                    model.parameters(), float(np.percentile(history, 10))
                )
            opt.step()
    _assert_params_close(a, b, rtol=1e-5)


def test_clipped_optimizer_grad_scaler_and_scheduler() -> None:
    torch.manual_seed(0)
    a = _mlp()
    b = copy.deepcopy(a)
    oa = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    clipper = ZClip(warmup_steps=3, nonfinite="skip")
    ob = ClippedOptimizer(torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9), clipper)
    sa = torch.amp.GradScaler("cpu", init_scale=1024.0)
    sb = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ref_z = ZClip(warmup_steps=3)
    sched = torch.optim.lr_scheduler.StepLR(ob, step_size=5, gamma=0.5)
    sched_a = torch.optim.lr_scheduler.StepLR(oa, step_size=5, gamma=0.5)
    X, Y = torch.randn(64, 20), torch.randn(64, 5)
    for step in range(12):
        for model, opt, scaler, ref in ((a, oa, sa, True), (b, ob, sb, False)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X), Y)
            scaler.scale(loss).backward()
            if step == 6:  # an overflow: GradScaler must skip the step, the clipper too
                next(model.parameters()).grad[0, 0] = math.inf
            if ref:
                scaler.unscale_(opt)
                grads = [p.grad for p in model.parameters()]
                if all(torch.isfinite(g).all() for g in grads):
                    ref_z(grads)
            scaler.step(opt)
            scaler.update()
        sched.step()
        sched_a.step()
    assert sa.get_scale() == sb.get_scale() < 1024.0
    assert clipper.step == ref_z.step == 11
    assert clipper.state_dict() == ref_z.state_dict() | {"nonfinite": "skip"}
    assert ob.param_groups[0]["lr"] == oa.param_groups[0]["lr"] == 0.05 * 0.25
    _assert_params_close(a, b, rtol=1e-5)


def test_clipped_optimizer_state_dict_round_trip() -> None:
    model = _mlp()
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters()), AutoClip(history=5))
    for _ in range(8):
        opt.zero_grad()
        model(torch.randn(4, 20)).sum().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = ClippedOptimizer(torch.optim.AdamW(model.parameters()), AutoClip(history=5))
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.clipper.state_dict() == opt.clipper.state_dict()
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_adamw_step_takes_a_0d_step_count() -> None:
    """step as a 0-d array or tensor (torch keeps its step counts in tensors)."""
    outs = []
    for step in (3, np.array(3), torch.tensor(3.0)):
        p, g = [np.ones(2, np.float32)], [np.array([0.5, -1.0], np.float32)]
        m, v = [np.zeros(2, np.float32)], [np.zeros(2, np.float32)]
        adamw_step_(p, g, m, v, step=step, lr=0.1)
        outs.append(p[0])
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])
    g64, zero = np.array([0.5, -1.0]), np.zeros(2)
    expected = reference.adamw_step(
        np.ones(2), g64, zero, zero, None, 3, 0.1, 0.9, 0.999, 1e-8, 1e-2, 1.0
    )[0]
    np.testing.assert_allclose(outs[0], expected, rtol=1e-6)


def _channels_last_cnn(seed: int = 0):
    """A small CNN in channels_last: its 4-D conv weights are not C-contiguous."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3), torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3),
    )  # fmt: skip
    return model.to(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("ref_cls", "our_cls", "kw"),
    [
        (torch.optim.AdamW, FusedAdamW, dict(lr=1e-2, weight_decay=0.1)),
        (torch.optim.AdamW, FusedAdamW, dict(lr=1e-2, amsgrad=True)),
        (torch.optim.SGD, FusedSGD, dict(lr=1e-2)),
        (torch.optim.SGD, FusedSGD, dict(lr=1e-2, momentum=0.9)),
    ],
    ids=["adamw", "adamw-amsgrad", "sgd", "sgd-momentum"],
)
def test_fused_optimizers_update_non_contiguous_parameters_like_torch(ref_cls, our_cls, kw):
    """channels_last conv weights (strided parameters) are updated in place through
    contiguous working copies, as torch updates them; none stays unchanged."""
    a = _channels_last_cnn()
    b = copy.deepcopy(a)
    assert not all(p.is_contiguous() for p in b.parameters())
    start = [p.detach().clone() for p in b.parameters()]
    oa, ob = ref_cls(a.parameters(), **kw), our_cls(b.parameters(), **kw)
    torch.manual_seed(2)
    x, y = torch.randn(16, 3, 8, 8), torch.randn(16, 3)
    x = x.to(memory_format=torch.channels_last)
    for _ in range(5):
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    _assert_params_close(a, b, rtol=1e-5)
    for p, p0 in zip(b.parameters(), start):
        assert not torch.equal(p.detach(), p0)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_functional_steps_update_strided_parameters(lib):
    """adamw_step_ / sgd_step_ on transposed views write through to the caller's memory,
    against the float64 formulas."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((3, 4)).astype(np.float32)
    g = rng.standard_normal((4, 3)).astype(np.float32)
    as_lib = (lambda a: a) if lib == "numpy" else torch.from_numpy
    p_base, m0, v0 = as_lib(base.copy()), np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32)
    p, m, v = p_base.T, as_lib(m0.copy()), as_lib(v0.copy())
    adamw_step_([p], [as_lib(g.copy())], [m], [v], step=1, lr=0.1, weight_decay=0.01)
    expected = reference.adamw_step(
        base.T.astype(np.float64), g, m0, v0, None, 1, 0.1, 0.9, 0.999, 1e-8, 0.01, 1.0
    )
    np.testing.assert_allclose(np.asarray(p_base).T, expected[0], rtol=1e-6)
    p_base = as_lib(base.copy())
    sgd_step_([p_base.T], [as_lib(g.copy())], lr=0.1)
    np.testing.assert_allclose(np.asarray(p_base).T, base.T - 0.1 * g, rtol=1e-6)


def test_state_sharing_memory_with_parameters_raises_and_writes_nothing():
    p = np.ones(3, np.float32)
    base = np.zeros((3, 4), np.float32)  # base[:, 0] and base.T[0]: one strided column
    g = [np.full(3, 0.5, np.float32)]
    for call in (
        lambda: adamw_step_([p], g, [p], [np.zeros(3, np.float32)], step=1),
        lambda: adamw_step_([base[:, 0]], g, [base[:, 0].copy()], [base.T[0]], step=1),
        lambda: sgd_step_([p], g, lr=0.1, momentum=0.9, momentum_buffers=[p]),
    ):
        with pytest.raises(ValueError, match="share"):
            call()
        np.testing.assert_array_equal(p, np.ones(3, np.float32))
        np.testing.assert_array_equal(base, np.zeros((3, 4), np.float32))


# ------------------------------------------------- public paths and pickles


def test_public_names_report_their_public_module() -> None:
    """Every public name of fastclip.torch and fastclip.distributed says so in
    ``__module__`` (reprs, docs and pickles name it), whichever file of the
    package defines it, as torch sets ``clip_grad_norm_.__module__ = "torch.nn.utils"``."""
    import importlib

    import fastclip.distributed as fcd
    import fastclip.torch as fct

    for module in (fct, fcd):
        for name in module.__all__:
            obj = getattr(module, name)
            assert obj.__module__ == module.__name__, name
            found = getattr(importlib.import_module(obj.__module__), obj.__qualname__)
            assert found is obj, name


def _trained_adamw(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = FusedAdamW(model.parameters(), lr=1e-2, amsgrad=True, max_norm=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(2, 4)).pow(2).sum().backward()
        opt.step()
    return model, opt


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k, state in a["state"].items():
        assert state.keys() == b["state"][k].keys()
        for name, value in state.items():
            assert torch.equal(value, b["state"][k][name]), (k, name)


def test_pickled_fused_adamw_and_its_state_dict_round_trip() -> None:
    """A pickled state dict loads into a new FusedAdamW and steps identically;
    a pickled optimizer is a FusedAdamW again, found at ``fastclip.torch``."""
    import pickle

    model, opt = _trained_adamw()
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    _assert_same_state(sd, opt.state_dict())

    twin = copy.deepcopy(model)
    loaded = FusedAdamW(twin.parameters(), lr=1e-2, amsgrad=True, max_norm=0.5)
    loaded.load_state_dict(sd)
    for m, o in ((model, opt), (twin, loaded)):
        o.zero_grad()
        m(torch.ones(2, 4)).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(opt.state_dict(), loaded.state_dict())

    blob = pickle.dumps(opt)
    assert b"fastclip.torch" in blob and b"fastclip.torch._" not in blob
    clone = pickle.loads(blob)
    assert type(clone) is FusedAdamW
    _assert_same_state(clone.state_dict(), opt.state_dict())
    for copied in (clone, copy.deepcopy(opt)):  # the clip settings travel too
        assert (copied.max_norm, copied.norm_type, copied.nonfinite) == (
            opt.max_norm,
            opt.norm_type,
            opt.nonfinite,
        )
    sgd = FusedSGD(model.parameters(), lr=0.1, max_norm=0.25, norm_type=1.0, nonfinite="skip")
    sgd_clone = pickle.loads(pickle.dumps(sgd))
    assert (sgd_clone.max_norm, sgd_clone.norm_type, sgd_clone.nonfinite) == (0.25, 1.0, "skip")

    clipped = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ZClip())
    again = pickle.loads(pickle.dumps(clipped))
    assert type(again) is ClippedOptimizer and type(again.clipper) is ZClip


def test_adamw_step_of_subnormal_float32_gradients_rounds_as_torch() -> None:
    """float32 moments of gradients ~1e-40 lie on the subnormal grid, and the
    update divides them by ~eps: the parameters leave the float64 formula by
    up to lr / ((1 - b1) eps) subnormals (3e-5 relative here), and torch.optim's
    float32 AdamW leaves it the same way.  A fuzzer find: the step is float32
    arithmetic, as torch's, not an error."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in (5, (2, 3))]
    grads = [(rng.standard_normal(p.shape) * 1e-40).astype(np.float32) for p in params]
    p64 = [p.astype(np.float64) for p in params]
    tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    for t, g in zip(tp, grads):
        t.grad = torch.from_numpy(g.copy())
    torch.optim.AdamW(tp, lr=1.0, betas=(0.1, 0.0), weight_decay=1.0, foreach=False).step()
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    adamw_step_(params, grads, ms, vs, step=1, lr=1.0, betas=(0.1, 0.0), weight_decay=1.0)
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    bound = 4 * tiny * 1.0 / ((1 - 0.1) * 1e-8)
    for p, t, pw, g in zip(params, tp, p64, grads):
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-6, atol=0)
        z = np.zeros_like(pw)
        want = reference.adamw_step(
            pw, g.astype(np.float64), z, z.copy(), None, 1, 1.0, 0.1, 0.0, 1e-8, 1.0, 1.0
        )[0]
        np.testing.assert_allclose(p, want, rtol=3e-5, atol=bound)
