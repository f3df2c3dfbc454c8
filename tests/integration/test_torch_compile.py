"""fastclip.torch under ``torch.compile`` (CPU, inductor) and in CUDA graphs.

Every compiled call is compared with the eager fastclip call (the same bits:
the operator runs the eager code) and with ``torch.nn.utils`` / ``torch.optim``
(float32 tolerance: fastclip accumulates norms differently); graph breaks are
counted with ``torch._dynamo.explain`` and ``fullgraph=True`` is used, which
raises on any break.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import fastclip
import fastclip.torch as fct

pytestmark = [
    # inductor imports torch.jit, deprecated in torch 2.13 (the suite turns warnings into errors)
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(seed: int = 0, step: int = 0) -> torch.nn.Module:
    """A small MLP with one backward pass's gradients (one parameter has none)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model.unused = torch.nn.Parameter(torch.ones(3))
    _backward(model, step)
    return model


def _backward(model: torch.nn.Module, step: int) -> None:
    torch.manual_seed(100 + step)
    model.zero_grad()
    (model(torch.randn(5, 8)).square().sum() * 3).backward()


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def _assert_close(a, b, exact: bool) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# (fastclip call, torch call) on a model; each returns the function's result
FUNCTIONS = {
    "clip_grad_norm_": (
        lambda m: fct.clip_grad_norm_(m.parameters(), 0.5),
        lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5),
    ),
    "clip_grad_norm_inf": (
        lambda m: fct.clip_grad_norm_(m.parameters(), 0.5, norm_type=math.inf),
        lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5, norm_type=math.inf),
    ),
    "clip_grad_norm_p0.5": (  # not a norm: torch's own formula, inside the operator
        lambda m: fct.clip_grad_norm_(m.parameters(), 0.5, norm_type=0.5),
        lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5, norm_type=0.5),
    ),
    "get_total_norm": (
        lambda m: fct.get_total_norm([p.grad for p in m.parameters() if p.grad is not None], 3.0),
        lambda m: torch.nn.utils.get_total_norm(
            [p.grad for p in m.parameters() if p.grad is not None], 3.0
        ),
    ),
    "clip_grads_with_norm_": (
        lambda m: fct.clip_grads_with_norm_(m.parameters(), 0.5, torch.tensor(4.0)),
        lambda m: torch.nn.utils.clip_grads_with_norm_(m.parameters(), 0.5, torch.tensor(4.0)),
    ),
    "clip_grad_value_": (
        lambda m: fct.clip_grad_value_(m.parameters(), 0.05),
        lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), 0.05),
    ),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_function_compiles_without_breaks_and_matches(name):
    fast, reference = FUNCTIONS[name]
    assert torch._dynamo.explain(fast)(_model()).graph_break_count == 0
    torch._dynamo.reset()
    compiled_model, eager_model, torch_model = _model(), _model(), _model()
    compiled = torch.compile(fast, fullgraph=True)(compiled_model)
    eager = fast(eager_model)
    expected = reference(torch_model)
    _assert_close(compiled, eager, exact=True)
    _assert_close(compiled, expected, exact=False)
    for c, e, t in zip(_grads(compiled_model), _grads(eager_model), _grads(torch_model)):
        _assert_close(c, e, exact=True)
        _assert_close(c, t, exact=False)
    # the in-place functions really wrote (the clip is active for this model)
    written = not torch.equal(_grads(compiled_model)[0], _grads(_model())[0])
    assert written == (name != "get_total_norm")


def test_compiled_function_recompiles_for_new_values():
    """A second call with other gradients and another max_norm gives eager's result.

    The parameters go in as a list: Dynamo cannot iterate a generator made
    outside the compiled function (torch's own clip_grad_norm_ fails the same way).
    """
    fn = torch.compile(fct.clip_grad_norm_, fullgraph=True)
    for max_norm in (0.5, 2.0):
        a, b = _model(seed=1), _model(seed=1)
        got = fn(list(a.parameters()), max_norm)
        _assert_close(got, fct.clip_grad_norm_(b.parameters(), max_norm), True)
        for x, y in zip(_grads(a), _grads(b)):
            assert torch.equal(x, y)


def test_compiled_errors_are_eager_errors():
    model = _model()
    before = [g.clone() for g in _grads(model)]
    # a bad argument is refused while tracing: the ValueError itself without
    # fullgraph, Dynamo's Unsupported carrying its message with fullgraph=True
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        torch.compile(fct.clip_grad_norm_)(list(model.parameters()), -1.0)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="max_norm must be >= 0"):
        torch.compile(fct.clip_grad_norm_, fullgraph=True)(list(model.parameters()), -1.0)
    torch._dynamo.reset()
    torch._dynamo.reset()
    _grads(model)[0][0, 0] = math.nan
    before[0][0, 0] = math.nan
    clip = torch.compile(fct.clip_grad_norm_, fullgraph=True)
    with pytest.raises(fastclip.NonFiniteNormError, match="non-finite"):
        clip(list(model.parameters()), 1.0, error_if_nonfinite=True)
    for g, b in zip(_grads(model), before):  # nothing written
        torch.testing.assert_close(g, b, rtol=0, atol=0, equal_nan=True)


def test_ops_pass_opcheck():
    """torch's own checker: schema, fake implementations against real results, mutations."""
    grads = _grads(_model())
    ops = torch.ops.fastclip
    torch.library.opcheck(ops.clip_grad_norm_, ([g.clone() for g in grads], 0.5, 2.0, False))
    torch.library.opcheck(ops.get_total_norm, ([g.clone() for g in grads], 2.0, False))
    torch.library.opcheck(
        ops.clip_grads_with_norm_, ([g.clone() for g in grads], 0.5, torch.tensor(4.0))
    )
    torch.library.opcheck(ops.clip_grad_value_, ([g.clone() for g in grads], 0.05))


def test_import_fastclip_registers_no_torch_op():
    code = (
        "import sys, fastclip\n"
        "bad = [m for m in ('torch', 'numba', 'cupy', 'jax') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "import fastclip.torch, torch\n"
        "assert hasattr(torch.ops.fastclip, 'clip_grad_norm_')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture_and_replay():
    """The four functions captured in one CUDA graph, replayed on new gradients in place."""
    torch.manual_seed(0)
    grads = [torch.randn(n, device="cuda") * 3 for n in (1000, 70_000, 5)]
    static = [g.clone() for g in grads]
    total_norm = torch.tensor(5.0, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernels built and tables cached before capture

        def calls():
            out = [fct.clip_grad_norm_(static, 1.0), fct.get_total_norm(static, 3.0)]
            fct.clip_grads_with_norm_(static, 0.9, total_norm)
            fct.clip_grad_value_(static, 0.01)
            return out

        calls()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = calls()
    for seed in (1, 2):
        torch.manual_seed(seed)
        fresh = [torch.randn_like(g) * 3 for g in grads]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        expected = [f.clone() for f in fresh]
        norm = torch.nn.utils.clip_grad_norm_(expected, 1.0)
        third = torch.nn.utils.get_total_norm(expected, 3.0)
        torch.nn.utils.clip_grads_with_norm_(expected, 0.9, total_norm)
        torch.nn.utils.clip_grad_value_(expected, 0.01)
        torch.testing.assert_close(outputs[0], norm, rtol=1e-5, atol=0)
        torch.testing.assert_close(outputs[1], third, rtol=1e-5, atol=0)
        for s, e in zip(static, expected):
            torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-7)


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


def _graph_breaks(step) -> int:
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(step)().graph_break_count
    torch._dynamo.reset()
    return breaks


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


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.float32),
    ],
)
def test_fake_norm_dtype_is_the_real_one(dtypes):
    """The fake implementation's dtype (what the compiled graph is built with) is
    the eager result's, which is torch's, for mixed and 16-bit gradient lists."""
    torch.manual_seed(0)
    tensors = [torch.randn(7).to(dtype) for dtype in dtypes]
    compiled = torch.compile(fct.get_total_norm, fullgraph=True, backend="aot_eager")(tensors)
    eager, expected = fct.get_total_norm(tensors), torch.nn.utils.get_total_norm(tensors)
    assert compiled.dtype == eager.dtype == expected.dtype
    assert torch.equal(compiled, eager)
    torch.library.opcheck(torch.ops.fastclip.get_total_norm, (tensors, 2.0, False))


def test_empty_inputs_compile_as_torchs():
    """No gradient (an empty generator, parameters without .grad): tensor(0.) and
    no write, no graph break, no warning, as torch's compiled clip_grad_norm_."""
    bare = torch.nn.Linear(2, 2)

    def fast(x):
        empty = fct.clip_grad_norm_((p for p in []), 1.0)
        fct.clip_grad_value_(bare.parameters(), 1.0)
        return empty + fct.clip_grad_norm_(bare.parameters(), 1.0) + fct.get_total_norm([]) + x

    def reference(x):
        empty = torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
        return empty + torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0) + x

    assert torch._dynamo.explain(fast)(torch.ones(1)).graph_break_count == 0
    torch._dynamo.reset()
    got = torch.compile(fast, fullgraph=True)(torch.ones(1))  # warnings are errors here
    with pytest.warns(UserWarning, match="empty generator"):  # eager torch warns
        expected = reference(torch.ones(1))
    assert torch.equal(got, expected) and torch.equal(got, torch.ones(1))
