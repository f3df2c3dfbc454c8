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
from _compile_helpers import assert_close as _assert_close
from _compile_helpers import fresh_dynamo  # noqa: F401  (autouse: Dynamo reset around each test)
from _compile_helpers import grads as _grads
from _compile_helpers import model as _model

import fastclip
import fastclip.torch as fct

pytestmark = [
    # inductor imports torch.jit, deprecated in torch 2.13 (the suite turns warnings into errors)
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


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
    "clip_grad_norm_module": (  # an nn.Module stands for its parameters' gradients
        lambda m: fct.clip_grad_norm_(m, 0.5),
        lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5),
    ),
    "get_total_norm_module": (
        lambda m: fct.get_total_norm(m, 2.0),
        lambda m: torch.nn.utils.get_total_norm(
            [p.grad for p in m.parameters() if p.grad is not None], 2.0
        ),
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
    assert written == (not name.startswith("get_total_norm"))


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
