"""fastclip.torch.BackwardNorm and the fused optimizers' ``norm_in_backward``.

This file owns the norm taken during backward: its values against a float64
NumPy oracle and ``torch.nn.utils``, its staleness rule (a gradient written
after its hook is measured again), its lifetime, and the training-loop parity
of ``FusedAdamW`` / ``FusedSGD(norm_in_backward=True)`` with torch's clip and
optimizers.  Its distributed cases (DDP, FSDP2) are in
``test_backward_norm_distributed.py``.
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import reference as R
import torch

import fastclip
import fastclip.torch as fct

NORM_TYPES = [1.0, 2.0, 3.5, math.inf]


class Tiny(torch.nn.Module):
    """Mixed dtypes and a parameter that never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 5)
        self.b = torch.nn.Linear(5, 4).double()
        self.c = torch.nn.Linear(4, 3)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h.double())).float()
        return self.c(h)


class GPTLike(torch.nn.Module):
    """A small causal transformer (embedding, 2 blocks, tied-free head)."""

    def __init__(self, vocab: int = 32, d: int = 16, seq: int = 8) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(seq, d) * 0.02)
        # bias=False: an attention key bias has no true gradient (softmax ignores
        # a shift), so its gradient is rounding noise that Adam's normalisation
        # turns into full-size steps: no two implementations agree on it.
        layer = torch.nn.TransformerEncoderLayer(
            d_model=d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True, bias=False
        )
        self.blocks = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


@pytest.fixture(autouse=True)
def hook_every_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hook every CPU parameter (the CPU default hooks none and measures every
    gradient in one packed pass when asked): the hooks' rules are what this file
    tests."""
    monkeypatch.setattr(fastclip._config, "BACKWARD_HOOK_MIN_NUMEL", 0)


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def _grads_of(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _oracle(model: torch.nn.Module, ord: float) -> float:
    return float(R.global_norm([g.detach().numpy() for g in _grads(model)], ord))


def _backward(model: torch.nn.Module, seed: int = 1, scale: float = 1.0) -> None:
    torch.manual_seed(seed)
    (model(torch.randn(4, 6)) * scale).pow(2).sum().backward()


@pytest.mark.parametrize("ord", NORM_TYPES)
def test_total_norm_is_the_global_norm_of_mixed_dtypes(ord: float) -> None:
    torch.manual_seed(0)
    model = Tiny()
    bn = fct.BackwardNorm(model, norm_type=ord)
    _backward(model)
    total = bn.total_norm()
    assert bn.last_remeasured == 0  # every norm came from a hook
    assert total.dtype == torch.float64  # torch's: a float64 gradient promotes
    np.testing.assert_allclose(float(total), _oracle(model, ord), rtol=1e-7)
    torch_total = torch.nn.utils.get_total_norm(_grads(model), ord)
    np.testing.assert_allclose(float(total), float(torch_total), rtol=1e-6)
    assert model.unused.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_total_norm_dtype_follows_torch(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 3).to(dtype)
    bn = fct.BackwardNorm(model.parameters())
    model(torch.randn(5, 7, dtype=dtype)).float().pow(2).sum().backward()
    total = bn.total_norm()
    expected = torch.nn.utils.get_total_norm(_grads(model))
    assert total.dtype == expected.dtype == dtype
    oracle = float(R.global_norm([g.float().numpy() for g in _grads(model)], 2.0))
    np.testing.assert_allclose(float(total), oracle, rtol=1e-2 if dtype != torch.float32 else 1e-6)


def test_accumulation_measures_the_sum_not_the_micro_batches() -> None:
    torch.manual_seed(0)
    model = Tiny()
    bn = fct.BackwardNorm(model)
    for seed in (1, 2, 3):
        _backward(model, seed)
    assert bn.last_remeasured == 0
    total = float(bn.total_norm())
    assert bn.last_remeasured == 0
    np.testing.assert_allclose(total, _oracle(model, 2.0), rtol=1e-7)


def test_accumulating_skips_the_hooks_and_stays_right() -> None:
    torch.manual_seed(0)
    model = Tiny()
    bn = fct.BackwardNorm(model)
    calls = []
    real = bn._measure
    bn._measure = lambda g: calls.append(1) or real(g)  # type: ignore[method-assign]
    with bn.accumulating():
        _backward(model, 1)
    assert calls == []
    _backward(model, 2)  # the last micro-batch: measured by the hooks
    assert len(calls) == 6  # every parameter with a gradient, once
    total = float(bn.total_norm())
    assert bn.last_remeasured == 0
    np.testing.assert_allclose(total, _oracle(model, 2.0), rtol=1e-7)
    with bn.accumulating():  # no last backward outside: measured at the call, still right
        model.zero_grad()
        _backward(model, 3)
    np.testing.assert_allclose(float(bn.total_norm()), _oracle(model, 2.0), rtol=1e-7)
    assert bn.last_remeasured == 6


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_and_parameters_without_a_gradient(set_to_none: bool) -> None:
    torch.manual_seed(0)
    model = Tiny()
    bn = fct.BackwardNorm(model)
    _backward(model, 1)
    model.zero_grad(set_to_none=set_to_none)
    total = bn.total_norm()
    assert float(total) == 0.0
    assert bn.last_remeasured == (0 if set_to_none else 6)
    # only `c` gets a gradient in this step
    torch.manual_seed(4)
    model.c(torch.randn(3, 4)).sum().backward()
    expected = _oracle(model, 2.0)
    np.testing.assert_allclose(float(bn.total_norm()), expected, rtol=1e-7)


def test_writes_after_the_hook_are_seen() -> None:
    torch.manual_seed(0)
    model = Tiny()
    bn = fct.BackwardNorm(model)
    _backward(model, 1)
    model.a.weight.grad.mul_(3.0)  # an in-place op: the version counter moves
    model.c.bias.grad = torch.full_like(model.c.bias, 2.0)  # a new tensor
    np.testing.assert_allclose(float(bn.total_norm()), _oracle(model, 2.0), rtol=1e-7)
    assert bn.last_remeasured == 2
    fct.clip_grad_norm_(model.parameters(), 0.5)  # fastclip's own kernels write too
    np.testing.assert_allclose(float(bn.total_norm()), 0.5, rtol=1e-5)
    assert bn.last_remeasured == 6


@pytest.mark.parametrize("ord", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clip_matches_torch_clip_grad_norm(ord: float, max_norm: float) -> None:
    torch.manual_seed(0)
    model = Tiny()
    bn = fct.BackwardNorm(model, ord)
    _backward(model, 1)
    twin = []
    for g in _grads(model):
        twin.append(torch.nn.Parameter(torch.zeros_like(g)))
        twin[-1].grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(twin, max_norm, ord)
    total = bn.clip_(max_norm)
    assert total.dtype == expected.dtype
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    for mine, theirs in zip(_grads(model), _grads_of(twin)):
        torch.testing.assert_close(mine, theirs, rtol=2e-6, atol=0)


def test_nonfinite_error_names_the_parameter_and_writes_nothing() -> None:
    torch.manual_seed(0)
    model = Tiny()
    bn = fct.BackwardNorm(model)
    _backward(model, 1)
    model.b.weight.grad[0, 0] = math.nan
    before = [g.clone() for g in _grads(model)]
    with pytest.raises(fastclip.NonFiniteNormError) as info:
        bn.clip_(0.1, error_if_nonfinite=True)
    assert list(info.value.indices) == [2]
    assert list(info.value.names) == ["b.weight"]
    for g, b in zip(_grads(model), before):
        assert torch.equal(g, b) or (torch.isnan(g).any() and torch.equal(g.isnan(), b.isnan()))
    assert math.isnan(float(bn.total_norm()))  # without error_if_nonfinite: NaN, as torch


def test_extreme_float64_norms_do_not_overflow() -> None:
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    v = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    bn = fct.BackwardNorm([w, v])
    (w * torch.tensor([3e200, 4e200, 0.0], dtype=torch.float64)).sum().backward()
    (v * 1e-300).sum().backward()
    np.testing.assert_allclose(float(bn.total_norm()), 5e200, rtol=1e-14)


def test_remove_and_context_manager() -> None:
    torch.manual_seed(0)
    model = Tiny()
    with fct.BackwardNorm(model) as bn:
        _backward(model, 1)
        assert bn.total_norm() is not None and bn.last_remeasured == 0
    assert "removed" in repr(bn)
    model.zero_grad()
    _backward(model, 2)
    np.testing.assert_allclose(float(bn.total_norm()), _oracle(model, 2.0), rtol=1e-7)
    assert bn.last_remeasured == 0  # no hooks: all measured at the call, none stale
    bn.remove()  # idempotent


def test_cpu_default_measures_at_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real default
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 600)
    bn = fct.BackwardNorm(model)
    opt = fct.FusedAdamW(model.parameters(), max_norm=0.1, norm_in_backward=True)
    assert "hooks=0" in repr(bn) and "hooks=0" in repr(opt.backward_norm)
    model(torch.randn(3, 1024)).pow(2).sum().backward()
    np.testing.assert_allclose(float(bn.total_norm()), _oracle(model, 2.0), rtol=1e-7)
    expected = _oracle(model, 2.0)  # torch's float32 norm is 7e-6 off here
    opt.step()
    np.testing.assert_allclose(float(opt.last_total_norm), expected, rtol=1e-7)


def test_small_gradients_are_measured_at_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``min_hook_numel`` no hook: those gradients are measured in one pass at
    the call; the large ones by their hooks."""
    monkeypatch.setattr(fastclip._config, "BACKWARD_HOOK_MIN_NUMEL", 1 << 19)
    torch.manual_seed(0)
    big = torch.nn.Linear(1024, 600)  # 614,400 weights: hooked; 600 biases: not
    bn = fct.BackwardNorm(big)
    assert "hooks=1" in repr(bn)
    calls = []
    real = bn._measure
    bn._measure = lambda g: calls.append(g.numel()) or real(g)  # type: ignore[method-assign]
    big(torch.randn(3, 1024)).pow(2).sum().backward()
    assert calls == [614_400]
    np.testing.assert_allclose(float(bn.total_norm()), _oracle(big, 2.0), rtol=1e-7)
    assert bn.last_remeasured == 0
    small = fct.BackwardNorm(torch.nn.Linear(3, 2), min_hook_numel=10**9)
    assert "hooks=0" in repr(small)


def test_bad_arguments() -> None:
    model = Tiny()
    with pytest.raises(ValueError, match="norm_type > 0"):
        fct.BackwardNorm(model, norm_type=0.0)
    with pytest.raises(ValueError, match="p > 0"):
        fct.BackwardNorm(model, norm_type=math.nan)
    with pytest.raises(TypeError, match="torch tensors"):
        fct.BackwardNorm([np.ones(3)])  # type: ignore[list-item]
    bn = fct.BackwardNorm(model)
    _backward(model, 1)
    before = [g.clone() for g in _grads(model)]
    with pytest.raises(ValueError):
        bn.clip_(-1.0)
    assert all(torch.equal(g, b) for g, b in zip(_grads(model), before))
    with pytest.raises(ValueError, match="needs max_norm"):
        fct.FusedAdamW(model.parameters(), norm_in_backward=True)


# ------------------------------------------------------- the fused optimizers


def _train(
    make_opt, steps: int = 50, accumulation: int = 2, max_norm: float | None = 0.3, seed: int = 0
) -> tuple[list[float], list[torch.Tensor], list[float]]:
    """Losses, final parameters and pre-clip norms of a GPT-style model trained
    with ``make_opt(params)``: an optimizer, or ("torch", optimizer) for torch's
    clip_grad_norm_ before its step."""
    torch.manual_seed(seed)
    model = GPTLike()
    made = make_opt(model.parameters())
    torch_clip = isinstance(made, tuple)
    opt = made[1] if torch_clip else made
    gen = torch.Generator().manual_seed(seed + 1)
    losses, norms = [], []
    for _ in range(steps):
        for _ in range(accumulation):
            idx = torch.randint(0, 32, (4, 8), generator=gen)
            logits = model(idx)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1)
            )
            (loss / accumulation).backward()
            losses.append(float(loss.detach()))
        if torch_clip and max_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        if not torch_clip and opt.last_total_norm is not None:
            norms.append(float(opt.last_total_norm))
        opt.zero_grad(set_to_none=True)
    return losses, [p.detach().clone() for p in model.parameters()], norms


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_fifty_steps_with_accumulation_match_torch(kind: str) -> None:
    max_norm = 0.3 if kind == "adamw" else 0.1
    if kind == "adamw":

        def theirs(ps):
            return ("torch", torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.01))

        def mine(ps):
            return fct.FusedAdamW(
                ps, lr=3e-3, weight_decay=0.01, max_norm=max_norm, norm_in_backward=True
            )
    else:

        def theirs(ps):
            return ("torch", torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True))

        def mine(ps):
            return fct.FusedSGD(
                ps, lr=0.05, momentum=0.9, nesterov=True, max_norm=max_norm, norm_in_backward=True
            )

    ref_losses, ref_params, ref_norms = _train(theirs, max_norm=max_norm)
    losses, params, norms = _train(mine, max_norm=max_norm)
    active = sum(n > max_norm for n in ref_norms)
    assert active >= 40, f"the clip must be active on most steps, was on {active} of 50"
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for (name, _), p, q in zip(GPTLike().named_parameters(), params, ref_params):
        assert _rel(p, q) <= 1e-6, name


def test_norm_in_backward_equals_the_norm_pass() -> None:
    def plain(ps):
        return fct.FusedAdamW(ps, lr=1e-2, max_norm=0.2)

    def hooked(ps):
        return fct.FusedAdamW(ps, lr=1e-2, max_norm=0.2, norm_in_backward=True)

    a = _train(plain, steps=10)
    b = _train(hooked, steps=10)
    np.testing.assert_allclose(b[2], a[2], rtol=1e-7)
    np.testing.assert_allclose(b[0], a[0], rtol=1e-7)


def test_fused_step_uses_the_hooks_norms() -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = fct.FusedSGD(model.parameters(), lr=0.1, max_norm=0.1, norm_in_backward=True)
    assert opt.norm_in_backward and opt.backward_norm is not None
    _backward(model, 1)
    expected = _oracle(model, 2.0)
    opt.step()
    assert opt.backward_norm.last_remeasured == 0
    np.testing.assert_allclose(float(opt.last_total_norm), expected, rtol=1e-7)


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_nonfinite_policies_with_norm_in_backward(policy: str) -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = fct.FusedAdamW(
        model.parameters(), lr=0.1, max_norm=0.1, nonfinite=policy, norm_in_backward=True
    )
    _backward(model, 1, scale=math.inf)
    before = [p.detach().clone() for p in model.parameters()]
    if policy == "error":
        with pytest.raises(fastclip.NonFiniteNormError):
            opt.step()
    else:
        opt.step()
        assert opt.last_step_skipped
    assert not opt.state  # no state created, no step counted
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def _amp_step(opt_kind: str, inject_inf: bool = False, unscale_first: bool = False):
    """One torch.amp.GradScaler step of Tiny: (parameters after, the norm clipped)."""
    torch.manual_seed(0)
    model = Tiny()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    if opt_kind == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    elif opt_kind == "standalone":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        bn = fct.BackwardNorm(model, grad_scaler=scaler)
    else:
        opt = fct.FusedAdamW(model.parameters(), lr=1e-2, max_norm=0.5, norm_in_backward=True)
    torch.manual_seed(1)
    scaler.scale(model(torch.randn(4, 6)).pow(2).sum()).backward()
    if inject_inf:
        model.a.weight.grad[0, 0] = math.inf
    norm = None
    if opt_kind == "torch":
        scaler.unscale_(opt)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
    elif opt_kind == "standalone":
        scaler.unscale_(opt)
        norm = float(bn.clip_(0.5))
        assert bn.last_remeasured == 6  # unscale_ rewrote them: measured again
    elif unscale_first:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    if opt_kind == "fused" and opt.last_total_norm is not None:
        norm = float(opt.last_total_norm)
        assert opt.backward_norm.last_remeasured == (6 if unscale_first else 0)
    return [p.detach().clone() for p in model.parameters()], norm


@pytest.mark.parametrize(
    ("kind", "unscale_first"), [("fused", False), ("fused", True), ("standalone", False)]
)
def test_grad_scaler_gives_torch_step(kind: str, unscale_first: bool) -> None:
    """torch.amp.GradScaler: the clipped norm is the unscaled gradients' norm, and the
    step equals unscale_ + torch's clip_grad_norm_ + AdamW.  scaler.step(FusedAdamW)
    hands over the scale (no unscale pass; the stored norm is divided by it)."""
    ref, ref_norm = _amp_step("torch")
    mine, norm = _amp_step(kind, unscale_first=unscale_first)
    assert norm is not None and ref_norm is not None and ref_norm > 0.5  # the clip is active
    np.testing.assert_allclose(norm, ref_norm, rtol=1e-6)
    for p, q in zip(mine, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_grad_scaler_inf_skips_the_fused_step() -> None:
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in Tiny().parameters()]
    for unscale_first in (False, True):
        after, norm = _amp_step("fused", inject_inf=True, unscale_first=unscale_first)
        assert norm is None
        for p, q in zip(after, initial):
            assert torch.equal(p, q)  # skipped, as torch's optimizers under the scaler


def test_invalidate_forgets_the_hooks() -> None:
    torch.manual_seed(0)
    model = Tiny()
    bn = fct.BackwardNorm(model)
    _backward(model, 1)
    with torch.no_grad():
        model.a.weight.grad.data.mul_(2.0)  # .data: no version counter moves
    bn.invalidate()
    np.testing.assert_allclose(float(bn.total_norm()), _oracle(model, 2.0), rtol=1e-7)
    assert bn.last_remeasured == 6


def test_add_param_group_is_hooked() -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = fct.FusedAdamW(
        [model.a.weight, model.a.bias], lr=1e-2, max_norm=0.1, norm_in_backward=True
    )
    opt.add_param_group({"params": [*model.b.parameters(), *model.c.parameters()]})
    _backward(model, 1)
    opt.step()
    assert opt.backward_norm is not None and opt.backward_norm.last_remeasured == 0
    np.testing.assert_allclose(
        float(opt.last_total_norm), float(torch.nn.utils.get_total_norm(_grads(model))), rtol=1e-6
    )


def test_state_dict_copy_and_pickle_keep_the_mode() -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = fct.FusedAdamW(model.parameters(), lr=1e-2, max_norm=0.1, norm_in_backward=True)
    _backward(model, 1)
    opt.step()
    # torch's AdamW loads the state dict, and a torch state dict loads back
    twin = copy.deepcopy(model)
    torch_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    torch_opt.load_state_dict(opt.state_dict())
    opt.load_state_dict(torch_opt.state_dict())
    assert opt.norm_in_backward
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.norm_in_backward and clone.max_norm == 0.1
        assert clone.backward_norm is not opt.backward_norm
    model2 = copy.deepcopy(model)
    opt2 = fct.FusedAdamW(model2.parameters(), lr=1e-2, max_norm=0.1, norm_in_backward=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares loaded tensors
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        _backward(m, 2)
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_info_says_where_the_norm_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = fastclip.info()["backward_norm"]
    assert rule.startswith("CPU: a post-accumulate-grad hook on every parameter")  # fixture
    monkeypatch.undo()
    rule = fastclip.info()["backward_norm"]
    assert rule == (
        "CPU: no hooks: one packed pass when the norm is asked for; "
        "CUDA: a post-accumulate-grad hook on every parameter"
    )
    monkeypatch.setattr(fastclip._config, "BACKWARD_HOOK_MIN_NUMEL", 1000)
    assert "CPU: hooks on parameters of >= 1,000 elements" in fastclip.info()["backward_norm"]


@pytest.mark.filterwarnings(  # inductor's own import of torch.jit, not fastclip's
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)
def test_compiled_step_uses_the_hooks() -> None:
    """torch.compile(opt.step): the custom operator runs the eager step, which clips
    with the hooks' norm; same weights as the eager optimizer."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Tiny()
        opt = fct.FusedAdamW(model.parameters(), lr=1e-2, max_norm=0.1, norm_in_backward=True)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for seed in (1, 2):
            _backward(model, seed)
            step()
            assert opt.backward_norm is not None and opt.backward_norm.last_remeasured == 0
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    torch._dynamo.reset()
    for a, b in zip(*results):
        assert torch.equal(a, b)
