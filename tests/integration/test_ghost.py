"""``fastclip.torch.GhostClipping`` and ``per_sample_grad_norms`` against two references.

(a) A float64 oracle written from DP-SGD's definition (Abadi et al., arXiv
1607.00133): the per-sample gradients materialised by ``torch.func.vmap(grad)``
on a float64 copy of the model, their norms ``n_b`` over all trainable
parameters, ``f_b = min(1, C / (n_b + 1e-6))`` and ``sum_b f_b g_b``.
(b) Opacus 1.6's ``GradSampleModuleFastGradientClipping`` with
``DPLossFastGradientClipping`` (ghost clipping; noise 0): its
``per_sample_gradient_norms``, each parameter's ``_norm_sample`` and the
clipped sum it leaves in ``.grad`` (for either reduction: its optimizer
divides by the batch size later).
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
opacus = pytest.importorskip("opacus")

import torch.nn.functional as F  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from fastclip.torch import GhostClipping, per_sample_grad_norms  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-6}


class Pool(nn.Module):
    """Mean over the sequence axis: [B, T, d] -> [B, d]."""

    def forward(self, x):
        return x.mean(1)


class Block(nn.Module):
    """A pre-norm transformer block of supported layers (attention from Linear q, k, v)."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (
            z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(self.ln1(x)).chunk(3, -1)
        )
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5  # no SDPA: vmap lacks it
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=13, d=8, heads=2, seq=6, classes=3):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.block, self.ln, self.head = Block(d, heads), nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)  # Opacus views it: contiguous
        return self.head(self.ln(self.block(self.tok(ids) + self.pos(pos))).mean(1))


def _case(name, batch=5):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if name == "linear":
        model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
        x = 2 * torch.randn(batch, 6, generator=g)
    elif name == "linear_seq":
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), Pool())
        x = torch.randn(batch, 4, 5, generator=g)
    elif name == "embedding":  # repeated ids within a sample exercise the row sums
        model = nn.Sequential(nn.Embedding(7, 6), nn.Linear(6, 3), Pool())
        x = torch.randint(0, 7, (batch, 9), generator=g)
    elif name == "conv1d":
        model = nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        model.append(nn.Linear(4 * 5, 3))
        x = torch.randn(batch, 3, 10, generator=g)
    elif name == "conv2d":
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2, dilation=1), nn.Tanh())
        model.extend([nn.Conv2d(4, 3, 2, stride=2), nn.Flatten(), nn.Linear(3 * 9, 3)])
        x = torch.randn(batch, 2, 6, 6, generator=g)
    elif name == "layernorm":
        model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3), Pool())
        x = torch.randn(batch, 4, 5, generator=g)
    else:
        model = TinyLM()
        x = torch.randint(0, 13, (batch, 6), generator=g)
    for p in model.parameters():  # LayerNorm starts at 1/0: move it off that point
        p.data.add_(0.3 * torch.randn(p.shape, generator=g))
    return model, x, torch.randint(0, 3, (batch,), generator=g)


CASES = ["linear", "linear_seq", "embedding", "conv1d", "conv2d", "layernorm", "transformer"]


def _loss(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def _bound(norms):
    """A bound between the middle two norms: clipping is active for some samples, not all."""
    mid = norms.sort().values[max(0, len(norms) // 2 - 1) : len(norms) // 2 + 1]
    return float(mid.mean())


def _oracle(model, x, y, max_norm=None):
    """float64 per-sample gradients by vmap(grad): norms, per-parameter norms, clipped sum."""
    m = copy.deepcopy(model).double()
    params = {k: p.detach() for k, p in m.named_parameters() if p.requires_grad}
    x = x.double() if x.is_floating_point() else x

    def one(p, xb, yb):
        return _loss(torch.func.functional_call(m, p, (xb[None],)), yb[None])[0]

    per = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    flat = {k: v.reshape(v.shape[0], -1) for k, v in per.items()}
    norms = torch.cat(list(flat.values()), 1).norm(dim=1)
    max_norm = _bound(norms) if max_norm is None else max_norm
    f = (max_norm / (norms + 1e-6)).clamp(max=1)
    summed = {k: torch.einsum("b,b...->...", f, v) for k, v in per.items()}
    return norms, {k: v.norm(dim=1) for k, v in flat.items()}, summed, max_norm


def _ours(model, x, y, max_norm, reduction="sum", form="auto"):
    m = copy.deepcopy(model)
    with GhostClipping(m, max_norm, loss_reduction=reduction, linear_form=form) as ghost:
        norms = ghost.backward(_loss(m(x), y))
    grads = {k: p.grad for k, p in m.named_parameters() if p.requires_grad}
    return norms, ghost.layer_norms, grads


def _opacus(model, x, y, max_norm, reduction):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    m = copy.deepcopy(model)
    gsm = GradSampleModuleFastGradientClipping(
        m, max_grad_norm=max_norm, loss_reduction=reduction, use_ghost_clipping=True
    )
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=max_norm,
        expected_batch_size=len(y),
        loss_reduction=reduction,
    )
    criterion = DPLossFastGradientClipping(
        gsm, opt, nn.CrossEntropyLoss(reduction=reduction), loss_reduction=reduction
    )
    criterion(gsm(x), y).backward()
    named = dict(m.named_parameters())
    layer = {k: p._norm_sample.detach() for k, p in named.items()}
    return gsm.per_sample_gradient_norms.detach(), layer, {k: p.grad for k, p in named.items()}


def _close(got, expected, scale=1.0):
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double() * scale, expected.double(), **TOL)


# Opacus' hooks on a first layer whose input needs no gradient (torch's documented case)
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", CASES)
def test_against_oracle_and_opacus(case, reduction):
    model, x, y = _case(case)
    o_norms, o_layer, o_sum, bound = _oracle(model, x, y)
    norms, layer, grads = _ours(model, x, y, bound, reduction)
    p_norms, p_layer, p_sum = _opacus(model, x, y, bound, reduction)
    scale = len(y) if reduction == "mean" else 1.0  # ours: the clipped mean; Opacus: the sum
    _close(norms, o_norms)
    _close(norms, p_norms)
    assert (o_norms > bound).any() and (o_norms < bound).any()
    assert set(layer) == set(o_layer) == set(grads)
    for k in grads:
        _close(layer[k], o_layer[k])
        _close(layer[k], p_layer[k])
        _close(grads[k], o_sum[k], scale)
        _close(grads[k], p_sum[k], scale)


@pytest.mark.parametrize("form", ["gram", "materialize"])
@pytest.mark.parametrize("case", ["linear_seq", "conv1d", "conv2d", "transformer"])
def test_both_forms_against_oracle(case, form):
    model, x, y = _case(case)
    o_norms, o_layer, o_sum, bound = _oracle(model, x, y)
    norms, layer, grads = _ours(model, x, y, bound, form=form)
    _close(norms, o_norms)
    for k in grads:
        _close(layer[k], o_layer[k])
        _close(grads[k], o_sum[k])


@pytest.mark.parametrize("route", ["fastclip", "torch"])
def test_both_row_norm_routes_against_oracle(route, monkeypatch):
    """The test shapes are below the size where fastclip.norm takes the row norms: force each."""
    from fastclip.torch import _ghost_layers

    monkeypatch.setattr(_ghost_layers, "use_fastclip_rows", lambda n: route == "fastclip")
    for case in ("embedding", "conv2d", "transformer"):
        model, x, y = _case(case)
        o_norms, o_layer, o_sum, bound = _oracle(model, x, y)
        norms, layer, grads = _ours(model, x, y, bound)
        _close(norms, o_norms)
        for k in grads:
            _close(layer[k], o_layer[k])
            _close(grads[k], o_sum[k])


def test_single_sample_and_empty_batch():
    model, x, y = _case("transformer", batch=1)
    half = 0.5 * float(_oracle(model, x, y)[0])  # clipped to half its norm
    o_norms, _, o_sum, _ = _oracle(model, x, y, max_norm=half)
    norms, _, grads = _ours(model, x, y, half, "mean")
    _close(norms, o_norms)
    for k in grads:
        _close(grads[k], o_sum[k])  # B = 1: the mean is the sum
    m = copy.deepcopy(model)
    with GhostClipping(m, 1.0) as ghost:  # an empty Poisson batch adds nothing
        norms = ghost.backward(_loss(m(x[:0]), y[:0]))
    assert norms.shape == (0,)
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())


def test_padding_idx_reflect_padding_and_frozen_layers():
    # the oracle only: Opacus 1.6 counts the padding row and zero-pads reflect convs
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Embedding(5, 4, padding_idx=0), nn.Linear(4, 4), nn.Linear(4, 3))
    model.append(Pool())
    model[1].weight.requires_grad_(False)
    x = torch.randint(0, 5, (6, 8), generator=g)
    x[:, :3] = 0
    y = torch.randint(0, 3, (6,), generator=g)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"), nn.Tanh())
    conv.extend([nn.Flatten(), nn.LayerNorm(3 * 16, bias=False), nn.Linear(3 * 16, 3)])
    conv[-1].requires_grad_(False)
    xc = torch.randn(6, 2, 4, 4, generator=g)
    for m, inp in ((model, x), (conv, xc)):
        o_norms, o_layer, o_sum, bound = _oracle(m, inp, y)
        norms, layer, grads = _ours(m, inp, y, bound)
        _close(norms, o_norms)
        assert set(grads) == set(o_sum) and len(grads) < len(list(m.parameters()))
        for k in grads:
            _close(layer[k], o_layer[k])
            _close(grads[k], o_sum[k])


def test_accumulates_into_existing_grad_and_passes_inplace_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    _, _, o_sum, bound = _oracle(model, x, y)
    start = {k: torch.full_like(p, 0.25) for k, p in model.named_parameters()}
    for k, p in model.named_parameters():
        p.grad = start[k].clone()
    with GhostClipping(model, bound, loss_reduction="sum") as ghost:
        ghost.backward(_loss(model(x), y))
    for k, p in model.named_parameters():
        _close(p.grad, o_sum[k] + start[k].double())


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.lin(x))


class _Bypass(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) + F.linear(x, self.lin.weight)


def _assert_untouched(model, before):
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, before[k])


@pytest.mark.parametrize("kind", ["tied", "bypass", "outside", "loss_2d", "no_graph", "batch"])
def test_bad_steps_raise_before_any_grad_is_written(kind):
    torch.manual_seed(0)
    model = _Tied() if kind == "tied" else _Bypass() if kind == "bypass" else nn.Linear(4, 4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {k: p.grad.clone() for k, p in model.named_parameters()}
    ghost = GhostClipping(model, 1.0)
    x = torch.randn(3, 4)
    out = model(x)
    loss = out.pow(2).sum(1)
    match = {"tied": "'lin.(weight|bias)' is used 2 times", "bypass": "'lin.weight' is used 2"}.get(
        kind, ""
    )
    if kind == "outside":
        loss = loss * torch.ones(3, requires_grad=True)
        match = "not a parameter of the model"
    elif kind == "loss_2d":
        loss, match = out.pow(2), r"1-D floating tensor \[B\]"
    elif kind == "no_graph":
        loss, match = loss.detach(), "no autograd graph"
    elif kind == "batch":
        loss, match = torch.cat([loss, loss]), "batch size 3, the loss 6"
    with pytest.raises(ValueError, match=match):
        ghost.backward(loss)
    _assert_untouched(model, before)
    ghost.remove()
    assert not model._forward_hooks


def test_bad_construction():
    with pytest.raises(TypeError, match="layer 'attn' has trainable parameters but"):
        GhostClipping(nn.ModuleDict({"attn": nn.MultiheadAttention(4, 2)}), 1.0)
    frozen = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))
    frozen[0].requires_grad_(False)
    GhostClipping(frozen, 1.0).remove()  # frozen unsupported layers are allowed
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        GhostClipping(nn.Embedding(4, 2, scale_grad_by_freq=True), 1.0)
    for kwargs, match in [
        ({"max_norm": -1.0}, "max_norm must be >= 0"),
        ({"max_norm": float("nan")}, "max_norm must be >= 0"),
        ({"max_norm": 1.0, "eps": float("inf")}, "eps must be finite"),
        ({"max_norm": 1.0, "loss_reduction": "none"}, "loss_reduction must be"),
        ({"max_norm": 1.0, "linear_form": "ghost"}, "linear_form must be one of"),
    ]:
        with pytest.raises(ValueError, match=f"fastclip.torch.GhostClipping: {match}"):
            GhostClipping(nn.Linear(2, 2), **kwargs)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        GhostClipping([nn.Linear(2, 2)], 1.0)  # type: ignore[arg-type]


def _materialised_linear(a, g):
    per = torch.einsum("bti,btj->bji", a.double(), g.double())
    return per.reshape(len(a), -1).norm(dim=1), g.double().sum(1).norm(dim=1)


@given(
    batch=st.integers(1, 4),
    t=st.integers(1, 6),
    d_in=st.integers(1, 7),
    d_out=st.integers(1, 7),
    form=st.sampled_from(["auto", "gram", "materialize"]),
    seed=st.integers(0, 2**16),
)
def test_linear_norms_property(batch, t, d_in, d_out, form, seed):
    g = torch.Generator().manual_seed(seed)
    a, grad = torch.randn(batch, t, d_in, generator=g), torch.randn(batch, t, d_out, generator=g)
    out = per_sample_grad_norms(nn.Linear(d_in, d_out), a, grad, linear_form=form)
    w, b = _materialised_linear(a, grad)
    _close(out["weight"], w)
    _close(out["bias"], b)


def test_per_sample_grad_norms_errors_and_dtype():
    lin = nn.Linear(3, 2)
    a, g = torch.randn(4, 3), torch.randn(4, 2)
    out = per_sample_grad_norms(lin, a.double(), g.double())
    assert out["weight"].dtype == torch.float64
    _close(out["weight"], a.double().norm(dim=1) * g.double().norm(dim=1))
    where = "fastclip.torch.per_sample_grad_norms: "
    with pytest.raises(TypeError, match=where + "BatchNorm1d has no ghost-norm rule"):
        per_sample_grad_norms(nn.BatchNorm1d(3), a, a)
    with pytest.raises(ValueError, match=where + "activation and output_grad have batch sizes"):
        per_sample_grad_norms(lin, a, g[:3])
    with pytest.raises(ValueError, match=where + "output_grad of shape"):
        per_sample_grad_norms(lin, a, a)
    with pytest.raises(TypeError, match=where + "output_grad must be a torch.Tensor"):
        per_sample_grad_norms(lin, a, g.numpy())
    with pytest.raises(ValueError, match=where + "linear_form must be one of"):
        per_sample_grad_norms(lin, a, g, linear_form="fast")
