"""ClippedOptimizer under ``torch.compile`` (CPU, inductor): a successful compiled
step against torch's own optimizer + ``torch.nn.utils.clip_grad_norm_`` and
against the eager wrapper, and what a failed compiled step leaves (documented in
the class docstring's **Failures**) against the eager wrapper."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from _compile_helpers import fresh_dynamo  # noqa: E402, F401  (autouse: Dynamo reset)
from torch.optim.optimizer import _use_grad_for_differentiable  # noqa: E402

import fastclip.torch as fct  # noqa: E402
from fastclip.adaptive import AutoClip, GlobalNormClipper  # noqa: E402

pytestmark = [
    # inductor imports torch.jit, deprecated in torch 2.13 (the suite turns warnings into errors)
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

MAX_NORM = 0.5


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _backward(model, step: int = 0):
    g = torch.Generator().manual_seed(10 + step)
    X, Y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    model.zero_grad()
    # no loss returned: Dynamo warns when a compiled training step hands back a
    # tensor that has a grad_fn after a graph break (the suite errors on warnings)
    (torch.nn.functional.mse_loss(model(X), Y) * 10.0).backward()


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


@pytest.mark.parametrize("how", ["compiled-step", "compiled-train-step"])
def test_compiled_step_is_torchs_clip_grad_norm_then_adamw(how) -> None:
    """A compiled ``opt.step`` (or a compiled training step calling it) gives the
    parameters of torch's AdamW after ``clip_grad_norm_``, and the eager wrapper's."""
    models = [_model(), _model(), _model()]  # compiled wrapper, eager wrapper, torch
    compiled_opt, eager_opt = (
        fct.ClippedOptimizer(_adamw(m.parameters()), GlobalNormClipper(MAX_NORM))
        for m in models[:2]
    )
    torch_opt = _adamw(models[2].parameters())
    if how == "compiled-step":
        compiled_step = torch.compile(compiled_opt.step)

        def train(i):
            _backward(models[0], i)
            compiled_step()

    else:
        train = torch.compile(lambda i: (_backward(models[0], i), compiled_opt.step()))
    for i in range(4):
        train(i)
        _backward(models[1], i)
        eager_opt.step()
        _backward(models[2], i)
        want_norm = torch.nn.utils.clip_grad_norm_(models[2].parameters(), MAX_NORM)
        torch_opt.step()
        assert float(want_norm) > MAX_NORM  # every step clips
        torch.testing.assert_close(compiled_opt.last_total_norm, want_norm, rtol=1e-6, atol=0)
        assert compiled_opt.clipper.step == eager_opt.clipper.step == i + 1
        for c, e, t in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(c, t, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)  # inductor's last bits
    got, want = compiled_opt.optimizer.state_dict(), torch_opt.state_dict()
    assert got["state"].keys() == want["state"].keys()
    for i, entry in want["state"].items():
        for key, value in entry.items():  # step, exp_avg, exp_avg_sq
            torch.testing.assert_close(got["state"][i][key], value, rtol=1e-5, atol=1e-7)


class _FailsAfterWriting(torch.optim.SGD):
    """A step that breaks the graph as torch.optim's steps do (``_use_grad``), writes
    a state entry and the parameters, then raises."""

    @_use_grad_for_differentiable
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["written"] = torch.ones_like(p)
                p.add_(1.0)
        raise RuntimeError("failed after writing")


class _FailsAtOnce(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("failed at once")


def _failing_pair(inner, make_clipper):
    """(model, wrapper) twice: the compiled one and an eager one."""
    pairs = []
    for restore in (True, False):
        model = _model()
        opt = fct.ClippedOptimizer(
            inner(model.parameters(), lr=0.1), make_clipper(), restore_on_error=restore
        )
        opt.clipper([torch.full((3,), 0.01)])  # one small recorded norm: the step clips
        pairs.append((model, opt))
    return pairs


@pytest.mark.parametrize("how", ["compiled-step", "compiled-train-step"])
@pytest.mark.parametrize(
    "make_clipper", [lambda: GlobalNormClipper(MAX_NORM), lambda: AutoClip(percentile=10)]
)
def test_failed_compiled_step_leaves_what_restore_on_error_false_leaves(how, make_clipper):
    """The documented behaviour: the clipper ran in a compiled graph before the
    wrapped step failed, so nothing is put back: the gradients clipped, the
    clipper updated and ``last_total_norm`` set, as the eager wrapper with
    ``restore_on_error=False`` leaves them (even with the default True), and the
    state entries the failed step created kept."""
    (model, opt), (eager_model, eager_opt) = _failing_pair(_FailsAfterWriting, make_clipper)
    ref_model = _model()  # torch's clip of the same gradients
    _backward(ref_model)
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), MAX_NORM)
    if how == "compiled-step":
        _backward(model)
        step = torch.compile(opt.step)
    else:
        step = torch.compile(lambda: (_backward(model), opt.step()))
    assert opt.restore_on_error
    with pytest.raises(RuntimeError, match="failed after writing"):
        step()
    _backward(eager_model)
    with pytest.raises(RuntimeError, match="failed after writing"):
        eager_opt.step()
    exact = how == "compiled-step"  # else inductor's backward: the gradients' last bits differ
    rtol = 0.0 if exact else 1e-5
    got, want = opt.clipper.state_dict(), eager_opt.clipper.state_dict()
    assert got.keys() == want.keys() and got["step"] == want["step"] == 2  # the failure counted
    for key, value in want.items():
        floats = isinstance(value, float) or (
            isinstance(value, list) and all(isinstance(v, float) for v in value)
        )
        close = pytest.approx(value, rel=rtol, abs=0) if floats and not exact else value
        assert got[key] == close, key
    torch.testing.assert_close(opt.last_total_norm, eager_opt.last_total_norm, rtol=rtol, atol=0)
    for p, e, r in zip(model.parameters(), eager_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, e.grad, rtol=rtol, atol=0 if exact else 1e-8)
        torch.testing.assert_close(p, e, rtol=rtol, atol=0 if exact else 1e-7)
        if isinstance(opt.clipper, GlobalNormClipper):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-8)
        assert torch.equal(opt.state[p]["written"], torch.ones_like(p))
    assert not eager_opt.state  # the eager step drops what the failed step created


@pytest.mark.filterwarnings("ignore:Dynamo (detected|does not know):UserWarning")
def test_compiled_step_failing_before_any_graph_runs_is_the_eager_restore():
    """A wrapped step that raises while Dynamo traces it, before any graph ran:
    Dynamo gives up on the frame and runs ``step()``'s own code, which takes the
    eager path (Dynamo still tries the clipper's frames, hence its warnings about
    what it cannot trace), and the eager restore applies."""
    (model, opt), _ = _failing_pair(_FailsAtOnce, lambda: AutoClip(percentile=10))
    ref_model = _model()
    _backward(model)
    _backward(ref_model)
    clipper_sd = opt.clipper.state_dict()
    with pytest.raises(RuntimeError, match="failed at once"):
        torch.compile(opt.step)()
    assert opt.clipper.state_dict() == clipper_sd and opt.last_total_norm is None
    for p, r in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p.grad, r.grad) and torch.equal(p, r)
    assert not opt.state
