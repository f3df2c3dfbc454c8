"""fastclip.torch's optimizers under ``torch.compile(opt.step)`` (CPU, inductor).

As torch's own optimizers are compiled.  Compiled steps are compared with
eager fastclip steps (the same bits) and with ``torch.nn.utils.clip_grad_norm_``
+ ``torch.optim`` (float32 tolerance); graph breaks are counted with
``torch._dynamo.explain`` and compared with torch's own count.
"""

from __future__ import annotations

import math

import pytest
import torch
from _compile_helpers import assert_close as _assert_close
from _compile_helpers import backward as _backward
from _compile_helpers import fresh_dynamo  # noqa: F401  (autouse: Dynamo reset around each test)
from _compile_helpers import grads as _grads
from _compile_helpers import graph_breaks as _graph_breaks
from _compile_helpers import model as _model

import fastclip
import fastclip.torch as fct

pytestmark = [
    # inductor imports torch.jit, deprecated in torch 2.13 (the suite turns warnings into errors)
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


# --- optimizers: torch.compile(opt.step), as torch's own optimizers are compiled

OPTIMIZERS = {
    "adamw": (
        lambda ps, **kw: fct.FusedAdamW(ps, lr=0.01, weight_decay=0.1, max_norm=0.5, **kw),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    ),
    "adamw_amsgrad_maximize": (
        lambda ps, **kw: fct.FusedAdamW(
            ps, lr=0.01, amsgrad=True, maximize=True, max_norm=0.5, **kw
        ),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True, maximize=True),
    ),
    "sgd_momentum": (
        lambda ps, **kw: fct.FusedSGD(
            ps, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01, max_norm=0.5, **kw
        ),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_step_compiles_and_matches(name):
    make, make_torch = OPTIMIZERS[name]
    models = [_model(), _model(), _model()]  # compiled, eager, torch
    compiled_opt, eager_opt = make(models[0].parameters()), make(models[1].parameters())
    torch_opt = make_torch(models[2].parameters())
    assert _graph_breaks(compiled_opt.step) <= _graph_breaks(torch_opt.step) == 0
    # explain ran a step on its optimizer; start over on fresh copies
    models = [_model(), _model(), _model()]
    compiled_opt, eager_opt = make(models[0].parameters()), make(models[1].parameters())
    torch_opt = make_torch(models[2].parameters())
    step = torch.compile(compiled_opt.step, fullgraph=True)
    for i in range(3):
        for m in models:
            _backward(m, i)
        step()
        eager_opt.step()
        torch.nn.utils.clip_grad_norm_(models[2].parameters(), 0.5)
        torch_opt.step()
        _assert_close(compiled_opt.last_total_norm, eager_opt.last_total_norm, exact=True)
        for c, e, t in zip(*(m.parameters() for m in models)):
            assert torch.equal(c, e)
            torch.testing.assert_close(c, t, rtol=1e-5, atol=1e-6)
    # the state is torch's: same keys and values; it loads into torch's optimizer
    ours, theirs = compiled_opt.state_dict(), torch_opt.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for k, state in ours["state"].items():
        assert state.keys() == theirs["state"][k].keys()
        for key, value in state.items():
            torch.testing.assert_close(value, theirs["state"][k][key], rtol=1e-5, atol=1e-6)
    make_torch(models[0].parameters()).load_state_dict(ours)


def test_compiled_step_follows_the_learning_rate_and_skips():
    """A scheduler's new lr takes effect; nonfinite="skip" leaves params and state as they were."""
    compiled_model, eager_model = _model(), _model()
    opts = [
        fct.FusedAdamW(m.parameters(), lr=0.01, max_norm=0.5, nonfinite="skip")
        for m in (compiled_model, eager_model)
    ]
    step = torch.compile(opts[0].step, fullgraph=True)
    for i, lr in enumerate((0.01, 0.1, 0.1)):
        for m, opt in zip((compiled_model, eager_model), opts):
            _backward(m, i)
            for group in opt.param_groups:
                group["lr"] = lr
        if i == 2:  # a non-finite gradient: the step is skipped
            for m in (compiled_model, eager_model):
                _grads(m)[0][0, 0] = math.inf
        before = [p.clone() for p in compiled_model.parameters()]
        step()
        opts[1].step()
        assert opts[0].last_step_skipped == opts[1].last_step_skipped == (i == 2)
        for c, e in zip(compiled_model.parameters(), eager_model.parameters()):
            assert torch.equal(c, e)
    for c, b in zip(compiled_model.parameters(), before):
        assert torch.equal(c, b)
    states = [opt.state_dict()["state"] for opt in opts]
    assert states[0].keys() == states[1].keys() and len(states[0]) == 4
    for k, state in states[0].items():
        assert state["step"].item() == states[1][k]["step"].item() == 2.0  # the skip counted none


@pytest.mark.parametrize("name", ["adamw_amsgrad_maximize", "sgd_momentum"])
def test_functionalising_backend_matches_eager(name):
    """aot_eager hands the operator copies of the mutated tensors and copies them
    back (inductor re-inplaces): the step must write only what it was given."""
    make, _ = OPTIMIZERS[name]
    compiled_model, eager_model = _model(), _model()
    compiled_opt, eager_opt = make(compiled_model.parameters()), make(eager_model.parameters())
    step = torch.compile(compiled_opt.step, backend="aot_eager", fullgraph=True)
    for i in range(3):
        for m in (compiled_model, eager_model):
            _backward(m, i)
        step()
        eager_opt.step()
        for c, e in zip(compiled_model.parameters(), eager_model.parameters()):
            assert torch.equal(c, e)
    for state, eager_state in zip(compiled_opt.state.values(), eager_opt.state.values()):
        for key, value in state.items():
            assert torch.equal(value, eager_state[key])


def test_compiled_step_nonfinite_error_writes_nothing():
    model = _model()
    opt = fct.FusedAdamW(model.parameters(), lr=0.1, max_norm=0.5, nonfinite="error")
    _grads(model)[0][0, 0] = math.nan
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(fastclip.NonFiniteNormError):
        torch.compile(opt.step, fullgraph=True)()
    assert not opt.state  # no state created by the refused step
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


# --- ClippedOptimizer: the clipper runs in an operator, the wrapped step is traced


def _clipped(params, inner: str, **clipper_kw):
    from fastclip.adaptive import GlobalNormClipper

    opt = (
        fct.FusedSGD(params, lr=0.1, momentum=0.9)
        if inner == "fused"
        else torch.optim.SGD(params, lr=0.1, momentum=0.9)
    )
    return fct.ClippedOptimizer(opt, GlobalNormClipper(0.5, **clipper_kw))


def test_clipped_optimizer_wrapping_fused_compiles_fullgraph():
    models = [_model(), _model(), _model()]  # compiled, eager, torch
    compiled_opt, eager_opt = (_clipped(m.parameters(), "fused") for m in models[:2])
    torch_opt = torch.optim.SGD(models[2].parameters(), lr=0.1, momentum=0.9)
    assert _graph_breaks(compiled_opt.step) == 0
    models = [_model(), _model(), _model()]
    compiled_opt, eager_opt = (_clipped(m.parameters(), "fused") for m in models[:2])
    torch_opt = torch.optim.SGD(models[2].parameters(), lr=0.1, momentum=0.9)
    step = torch.compile(compiled_opt.step, fullgraph=True)
    for i in range(3):
        for m in models:
            _backward(m, i)
        step()
        eager_opt.step()
        torch.nn.utils.clip_grad_norm_(models[2].parameters(), 0.5)
        torch_opt.step()
        assert compiled_opt.last_total_norm == eager_opt.last_total_norm
        assert compiled_opt.clipper.step == eager_opt.clipper.step == i + 1  # its state moved
        for c, e, t in zip(*(m.parameters() for m in models)):
            assert torch.equal(c, e)
            torch.testing.assert_close(c, t, rtol=1e-5, atol=1e-6)


def test_clipped_optimizer_wrapping_torch_breaks_as_torch_does():
    """torch.optim's step breaks the graph on purpose (``_use_grad``, pytorch issue
    104053) when it is called from a compiled function: clip + step written with
    torch's own functions gives the reference count."""
    models = [_model(), _model(), _model()]  # fastclip compiled, torch compiled, fastclip eager
    compiled_opt, eager_opt = (
        _clipped(models[0].parameters(), "torch"),
        _clipped(models[2].parameters(), "torch"),
    )
    torch_opt = torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9)
    params = list(models[1].parameters())

    def torch_step():
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        torch_opt.step()

    ours, theirs = _graph_breaks(compiled_opt.step), _graph_breaks(torch_step)
    assert ours <= theirs
    models = [_model(), _model(), _model()]
    compiled_opt, eager_opt = (
        _clipped(models[0].parameters(), "torch"),
        _clipped(models[2].parameters(), "torch"),
    )
    torch_opt = torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9)
    params = list(models[1].parameters())
    steps = torch.compile(compiled_opt.step), torch.compile(torch_step)
    for i in range(3):
        for m in models:
            _backward(m, i)
        for step in steps:
            step()
        eager_opt.step()
        for c, t, e in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(c, t, rtol=1e-6, atol=1e-7)  # torch compiled
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)  # inductor's last bits


def test_clipped_optimizer_skip_policy_under_compile():
    """nonfinite="skip" decides on the host: one graph break, the eager behaviour."""
    compiled_model, eager_model = _model(), _model()
    opts = [
        _clipped(m.parameters(), "fused", nonfinite="skip") for m in (compiled_model, eager_model)
    ]
    step = torch.compile(opts[0].step)
    for i in range(3):
        for m in (compiled_model, eager_model):
            _backward(m, i)
            if i == 1:
                _grads(m)[0][0, 0] = math.nan
        step()
        opts[1].step()
        assert opts[0].clipper.last_step_skipped == opts[1].clipper.last_step_skipped == (i == 1)
        for c, e in zip(compiled_model.parameters(), eager_model.parameters()):
            assert torch.equal(c, e)
    torch._dynamo.reset()
    _backward(compiled_model, 5)
    assert torch._dynamo.explain(opts[0].step)().graph_break_count == 1
