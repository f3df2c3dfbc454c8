"""ClippedOptimizer's loads, read-through attributes, failed steps, closures and
checkpoint layouts, each against torch's own optimizer (a plain clip + torch.optim
step) as the reference."""

from __future__ import annotations

import copy
import re

import pytest

import fastclip.adaptive

torch = pytest.importorskip("torch")

from fastclip.adaptive import AutoClip, GlobalNormClipper, ZClip  # noqa: E402
from fastclip.torch import ClippedOptimizer  # noqa: E402


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def _backward(model, scale: float = 1.0):
    X, Y = _data()
    model.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), Y) * scale
    loss.backward()
    return loss


def _train(opt, model, steps=4):
    for _ in range(steps):
        _backward(model, 10.0)
        opt.step()


def _same(a, b) -> bool:
    """Deep equality of state dicts (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b or (a != a and b != b)


def _snapshot(opt):
    return (
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(opt.optimizer.state_dict()),
        copy.deepcopy(opt.clipper.state_dict()),
        opt.param_groups,
        opt.optimizer.param_groups,
    )


def _assert_unchanged(opt, before):
    after = _snapshot(opt)
    assert _same(after[0], before[0]) and _same(after[1], before[1]) and after[2] == before[2]
    assert after[3] is before[3] and after[4] is before[4]
    assert opt.param_groups is opt.optimizer.param_groups


# --------------------------------------------------------------- 1. refused loads


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
@pytest.mark.parametrize(
    "spoil",
    [
        lambda c: c.__setitem__("step", -5),
        lambda c: c.pop("alpha"),
        lambda c: c.__setitem__("mean", "x"),
    ],
    ids=["negative-step", "missing-key", "bad-type"],
)
def test_refused_load_changes_nothing_and_keeps_the_groups_linked(spoil) -> None:
    model = _model()
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), ZClip(warmup_steps=2))
    _train(opt, model, 2)
    other = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.5), ZClip(warmup_steps=2))
    _train(other, model, 5)
    bad = copy.deepcopy(other.state_dict())
    spoil(bad["fastclip_clipper"])
    before = _snapshot(opt)
    with pytest.raises((ValueError, TypeError), match=r"ClippedOptimizer\.load_state_dict"):
        opt.load_state_dict(bad)
    _assert_unchanged(opt, before)
    # a scheduler on the wrapper still moves the optimizer that steps
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5).step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.01 * 0.5


def test_refused_optimizer_part_leaves_the_clipper_as_it_was() -> None:
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), AutoClip(history=4))
    _train(opt, model, 3)
    other = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), AutoClip(history=4))
    _train(other, model, 6)
    bad = copy.deepcopy(other.state_dict())
    bad["param_groups"][0]["params"] = bad["param_groups"][0]["params"][:1]
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="doesn't match the size"):  # torch's own check
        opt.load_state_dict(bad)
    _assert_unchanged(opt, before)


# ------------------------------------------- 2. attributes read through the wrapped one


def test_loading_the_inner_optimizer_directly_keeps_the_wrapper_in_sync() -> None:
    ref_model, model = _model(), _model()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), GlobalNormClipper(0.5)
    )
    for m, o in ((ref_model, ref), (model, opt.optimizer)):
        _backward(m)
        o.step()
    opt.optimizer.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state
    assert opt.defaults is opt.optimizer.defaults
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler_ref = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    for _ in range(3):
        for m, o, s, clip in ((ref_model, ref, scaler_ref, True), (model, opt, scaler, False)):
            o.zero_grad()
            X, Y = _data()
            s.scale(torch.nn.functional.mse_loss(m(X), Y) * 10).backward()
            if clip:
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            s.step(o)
            s.update()
        sched_ref.step()
        sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.1 / 8
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "lr": 0.3})
    assert opt.optimizer.param_groups[-1]["params"][0] is extra


# --------------------------------------------------------------- 3. a failing step


class _Failing(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("inner step failed")


@pytest.mark.parametrize(
    "make_inner",
    [
        lambda p: torch.optim.Adam(p, lr=0.01, capturable=True),  # torch refuses CPU tensors
        lambda p: _Failing(p, lr=0.01),
    ],
    ids=["adam-capturable-on-cpu", "raising-step"],
)
@pytest.mark.parametrize(
    "make_clipper", [lambda: AutoClip(percentile=10), lambda: ZClip(warmup_steps=1)]
)
def test_failed_step_leaves_grads_params_state_and_clipper_as_before(
    make_inner, make_clipper
) -> None:
    model = _model()
    opt = ClippedOptimizer(make_inner(model.parameters()), make_clipper())
    opt.clipper([torch.full((3,), 0.01)])  # one small recorded norm: the next step clips
    _backward(model, 10.0)
    grads = [p.grad.clone() for p in model.parameters()]
    grad_ids = [id(p.grad) for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    clipper_attrs = copy.deepcopy(vars(opt.clipper))
    inner_sd = copy.deepcopy(opt.optimizer.state_dict())
    plain = make_inner(_model().parameters())  # torch's own error for the same call
    for p in plain.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(Exception) as want:  # torch raises an AssertionError
        plain.step()
    with pytest.raises(want.type, match=re.escape(str(want.value))):
        opt.step()
    for p, g, i, w in zip(model.parameters(), grads, grad_ids, params):
        assert torch.equal(p.grad, g) and id(p.grad) == i and torch.equal(p, w)
    assert vars(opt.clipper).keys() == clipper_attrs.keys()
    assert opt.clipper.state_dict() == _state_of(clipper_attrs, opt.clipper)
    for key in ("step", "last_total_norm", "last_threshold", "last_step_skipped"):
        assert getattr(opt.clipper, key) == clipper_attrs[key]
    assert _same(opt.optimizer.state_dict(), inner_sd)


def test_restore_on_error_false_leaves_what_a_manual_clip_leaves() -> None:
    """The documented opt-out: no copies, so a failed step leaves the gradients as
    ``clip_grad_norm_`` would have clipped them and the clipper updated."""
    model, ref_model = _model(), _model()
    opt = ClippedOptimizer(
        _Failing(model.parameters(), lr=0.1), GlobalNormClipper(0.5), restore_on_error=False
    )
    _backward(model, 10.0)
    _backward(ref_model, 10.0)
    want = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
    with pytest.raises(RuntimeError, match="inner step failed"):
        opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(opt.last_total_norm, want, rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="restore_on_error must be True or False"):
        ClippedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), GlobalNormClipper(1.0), restore_on_error=1
        )


def _state_of(attrs, clipper):
    twin = copy.copy(clipper)
    twin.__dict__ = copy.deepcopy(attrs)
    return twin.state_dict()


def test_retry_after_a_failed_step_counts_the_norm_once() -> None:
    ref_model, model = _model(), _model()
    ref_clip = AutoClip(percentile=50)
    opt = ClippedOptimizer(_Failing(model.parameters(), lr=0.1), AutoClip(percentile=50))
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for _ in range(3):
        _backward(ref_model, 10.0)
        ref_clip([p.grad for p in ref_model.parameters()])
        ref.step()
        _backward(model, 10.0)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="inner step failed"):
                opt.step()
        opt.optimizer.__class__ = torch.optim.SGD  # the cause fixed: the retry succeeds
        opt.step()
        opt.optimizer.__class__ = _Failing
    assert opt.clipper.state_dict() == ref_clip.state_dict()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------- 4. closures (LBFGS)


def _lbfgs_run(opt, model, clip_ref=None, steps=3):
    X, Y = (t.to(next(model.parameters()).dtype) for t in _data())

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), Y)
        loss.backward()
        if clip_ref is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_ref)
        return loss

    return [float(opt.step(closure).detach()) for _ in range(steps)]


def test_lbfgs_with_an_inactive_clip_is_torchs_lbfgs_bit_for_bit() -> None:
    ref_model, model = _model(), _model()
    ref = torch.optim.LBFGS(ref_model.parameters(), lr=0.5, max_iter=5)
    opt = ClippedOptimizer(
        torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), GlobalNormClipper(1e9)
    )
    assert _lbfgs_run(opt, model) == _lbfgs_run(ref, ref_model)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert opt.clipper.step == ref.state[next(ref_model.parameters())]["func_evals"]


def test_lbfgs_clips_every_evaluation_as_a_clipping_closure() -> None:
    ref_model, model = _model().double(), _model().double()
    ref = torch.optim.LBFGS(ref_model.parameters(), lr=0.1, max_iter=5)
    opt = ClippedOptimizer(
        torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=5), GlobalNormClipper(0.05)
    )
    losses = _lbfgs_run(opt, model, steps=1)
    want = _lbfgs_run(ref, ref_model, clip_ref=0.05, steps=1)
    assert opt.clipper.step == ref.state[next(ref_model.parameters())]["func_evals"] == 5
    # fastclip's norm and torch's may differ in the last bit, which LBFGS's curvature
    # pairs amplify (measured: 2e-11 relative after one step of 5 evaluations, 5e-6
    # after three steps); clipping the first evaluation alone is off by far more.
    assert losses == pytest.approx(want, rel=1e-12)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_lbfgs_skip_at_a_later_evaluation_undoes_the_whole_step() -> None:
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5),
        GlobalNormClipper(1e9, nonfinite="skip"),
    )
    _lbfgs_run(opt, model, steps=1)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.optimizer.state_dict())
    clip_step = opt.clipper.step
    X, Y = _data()
    calls = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), Y)
        loss.backward()
        calls.append(1)
        if len(calls) == 2:
            next(model.parameters()).grad[0, 0] = float("nan")
        return loss

    opt.step(closure)
    assert len(calls) == 2 and opt.clipper.last_step_skipped and opt.clipper.step == clip_step
    for p, w in zip(model.parameters(), params):
        assert torch.equal(p, w)
    assert _same(opt.optimizer.state_dict(), state)


def test_a_closure_with_sgd_is_evaluated_once_then_clipped() -> None:
    ref_model, model = _model(), _model()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), GlobalNormClipper(0.05))
    assert _lbfgs_run(opt, model) == _lbfgs_run(ref, ref_model, clip_ref=0.05)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert opt.clipper.step == 3


# ---------------------------------------------------------- 5. checkpoint layouts


def test_plain_optimizer_state_dict_is_refused_with_the_fix() -> None:
    model = _model()
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters()), ZClip())
    _train(opt, model, 2)
    plain = torch.optim.AdamW(model.parameters())
    before = _snapshot(opt)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(plain.state_dict())
    text = str(info.value)
    assert text.startswith("fastclip.torch.ClippedOptimizer.load_state_dict: ")
    assert "opt.optimizer.load_state_dict(sd)" in text and "'param_groups'" in text
    _assert_unchanged(opt, before)
    with pytest.raises(ValueError, match=r"expected ClippedOptimizer\.state_dict"):
        opt.load_state_dict({"foo": 1})


def test_both_layouts_load_and_a_plain_optimizer_loads_ours() -> None:
    model = _model()
    src = ClippedOptimizer(torch.optim.AdamW(model.parameters()), ZClip(warmup_steps=2))
    _train(src, model, 4)
    new_layout = copy.deepcopy(src.state_dict())
    old_layout = {
        "optimizer": copy.deepcopy(src.optimizer.state_dict()),
        "clipper": src.clipper.state_dict(),
    }
    for sd in (new_layout, old_layout):
        dst = ClippedOptimizer(torch.optim.AdamW(model.parameters()), ZClip(warmup_steps=2))
        dst.load_state_dict(sd)
        assert _same(dst.optimizer.state_dict(), src.optimizer.state_dict())
        assert dst.clipper.state_dict() == src.clipper.state_dict()
        assert dst.param_groups is dst.optimizer.param_groups
    plain = torch.optim.AdamW(model.parameters())
    plain.load_state_dict(copy.deepcopy(new_layout))  # torch ignores the clipper's key
    assert _same(plain.state_dict(), src.optimizer.state_dict())


def test_dcp_state_dict_round_trip() -> None:
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    model = _model()
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters()), ZClip(warmup_steps=2))
    _train(opt, model, 3)
    want = dcp.get_optimizer_state_dict(model, opt.optimizer)
    got = dcp.get_optimizer_state_dict(model, opt)  # was KeyError 'state'
    assert _same(got, want)
    saved = {"optim": copy.deepcopy(want), "clipper": opt.clipper.state_dict()}
    fresh = ClippedOptimizer(torch.optim.AdamW(model.parameters()), ZClip(warmup_steps=2))
    dcp.set_optimizer_state_dict(model, fresh.optimizer, saved["optim"])
    fresh.clipper.load_state_dict(saved["clipper"])
    assert _same(fresh.optimizer.state_dict(), opt.optimizer.state_dict())
    assert fresh.clipper.state_dict() == opt.clipper.state_dict()


@pytest.mark.parametrize(
    "make_clipper",
    [
        lambda: AutoClip(percentile=30),
        lambda: AutoClip(percentile=30, history=3),
        lambda: ZClip(warmup_steps=2),
        lambda: GlobalNormClipper(0.5),
        lambda: fastclip.adaptive.AGC(0.01),
    ],
    ids=["autoclip", "autoclip-history", "zclip", "global", "agc"],
)
def test_every_fastclip_clipper_is_put_back_after_a_failed_step(make_clipper) -> None:
    """Every clipper ``clipper(grads, params)`` takes.  The snapshot copies only
    containers (not their elements): a clipper that updated an element in place
    would differ from a twin that never saw the failed steps."""
    ref_model, model = _model(), _model()
    twin = make_clipper()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    opt = ClippedOptimizer(_Failing(model.parameters(), lr=0.1), make_clipper())
    for i in range(6):
        _backward(ref_model, 1.0 + i)
        twin([p.grad for p in ref_model.parameters()], list(ref_model.parameters()))
        ref.step()
        _backward(model, 1.0 + i)
        opt.optimizer.__class__ = _Failing
        with pytest.raises(RuntimeError, match="inner step failed"):
            opt.step()
        opt.optimizer.__class__ = torch.optim.SGD
        opt.step()
        assert _same(opt.clipper.state_dict(), twin.state_dict())
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
