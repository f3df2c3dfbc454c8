"""fastclip.torch against torch.nn.utils on the gradients of real torch.nn models.

This file owns parity of fastclip.torch with torch.nn.utils on real models; the core
operations' values are in tests/api/, fastclip.torch's contract fuzzing in
tests/api/test_fuzz_steps.py.

Each test builds the same model twice (same seed, same batch, same backward),
applies torch's function to one copy and fastclip's to the other, and compares
the returned norms (value, dtype, shape) and the resulting gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastclip
import fastclip.torch as fct

NORM_TYPES = [1.0, 2.0, math.inf, 3.0]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, 32),
            torch.nn.GELU(),
            torch.nn.Linear(32, 32),
            torch.nn.Tanh(),
            torch.nn.Linear(32, 3),
        )
        self.unused = torch.nn.Parameter(torch.ones(5))  # its .grad stays None

    def forward(self, x):
        return self.body(x)


class Transformer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(
            d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(16, 3)
        self.unused = torch.nn.Parameter(torch.ones(2, 2))

    def forward(self, x):
        return self.head(self.encoder(x.reshape(x.shape[0], 2, 16)))


def _model(kind, dtype=torch.float32, scale=1.0):
    """A model with gradients from one backward pass (deterministic)."""
    torch.manual_seed(0)
    model = (MLP if kind == "mlp" else Transformer)().to(dtype)
    x = torch.randn(6, 32 if kind == "transformer" else 8, dtype=dtype)
    (model(x).square().sum() * scale).backward()
    return model


def _pair(kind, dtype=torch.float32, scale=1.0):
    return _model(kind, dtype, scale), _model(kind, dtype, scale)


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _assert_same_grads(ours, theirs, dtype):
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert a.grad.dtype == b.grad.dtype
            np.testing.assert_allclose(
                a.grad.double().numpy(),
                b.grad.double().numpy(),
                rtol=TOL[dtype],
                atol=1e-30,
                equal_nan=True,
            )


def _assert_same_norm(ours, theirs, dtype):
    assert isinstance(ours, torch.Tensor)
    assert (
        ours.dtype == theirs.dtype and ours.shape == theirs.shape and ours.device == theirs.device
    )
    np.testing.assert_allclose(
        ours.double().numpy(), theirs.double().numpy(), rtol=TOL[dtype], equal_nan=True
    )


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clipped", "unchanged"])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_clip_grad_norm_(kind, norm_type, max_norm, foreach):
    ours, theirs = _pair(kind)
    got = fct.clip_grad_norm_(ours.parameters(), max_norm, norm_type, foreach=foreach)
    expected = torch.nn.utils.clip_grad_norm_(
        theirs.parameters(), max_norm, norm_type, foreach=foreach
    )
    _assert_same_norm(got, expected, torch.float32)
    _assert_same_grads(ours, theirs, torch.float32)


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_clip_grad_norm_other_dtypes(kind, dtype, norm_type):
    ours, theirs = _pair(kind, dtype)
    got = fct.clip_grad_norm_(ours.parameters(), 0.05, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05, norm_type)
    _assert_same_norm(got, expected, dtype)
    _assert_same_grads(ours, theirs, dtype)


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.complex64,),
        (torch.complex128, torch.float32),
        (torch.complex64, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.complex128),
        (torch.float16,),
    ],
    ids=lambda ds: "+".join(str(d).removeprefix("torch.") for d in ds),
)
def test_norm_dtype_of_mixed_and_complex_gradients_matches_torch(dtypes, norm_type):
    """torch's total norm has the promoted dtype of the per-tensor norms: real
    for complex gradients, float32 for float16 + bfloat16."""
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.zeros(7 + i, dtype=d)) for i, d in enumerate(dtypes * 2)]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, theirs):
        q.grad = p.grad.clone()
    tol = 2e-2 if {torch.float16, torch.bfloat16} & set(dtypes) else 1e-6
    got = fct.get_total_norm([p.grad for p in params], norm_type)
    expected = torch.nn.utils.get_total_norm([q.grad for q in theirs], norm_type)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_allclose(got.double().numpy(), expected.double().numpy(), rtol=tol)
    got = fct.clip_grad_norm_(params, 0.5, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got.double().numpy(), expected.double().numpy(), rtol=tol)
    for p, q in zip(params, theirs):
        assert p.grad.dtype == q.grad.dtype
        np.testing.assert_allclose(_as_numpy(p.grad), _as_numpy(q.grad), rtol=tol, atol=1e-7)


def _as_numpy(t):
    return t.numpy() if t.is_complex() else t.double().numpy()


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_get_total_norm_and_clip_grads_with_norm_(kind, norm_type, foreach):
    ours, theirs = _pair(kind)
    grads_ours = [p.grad for p in ours.parameters() if p.grad is not None]
    grads_theirs = [p.grad for p in theirs.parameters() if p.grad is not None]
    got = fct.get_total_norm(grads_ours, norm_type, foreach=foreach)
    expected = torch.nn.utils.get_total_norm(grads_theirs, norm_type, foreach=foreach)
    _assert_same_norm(got, expected, torch.float32)
    fct.clip_grads_with_norm_(ours.parameters(), 0.05, got, foreach=foreach)
    torch.nn.utils.clip_grads_with_norm_(theirs.parameters(), 0.05, expected, foreach=foreach)
    _assert_same_grads(ours, theirs, torch.float32)


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_clip_grad_value_(kind, dtype, foreach):
    ours, theirs = _pair(kind, dtype)
    assert fct.clip_grad_value_(ours.parameters(), 0.01, foreach=foreach) is None
    torch.nn.utils.clip_grad_value_(theirs.parameters(), 0.01, foreach=foreach)
    _assert_same_grads(ours, theirs, torch.float32 if dtype == torch.bfloat16 else dtype)


def test_single_tensor_and_generator_inputs():
    ours, theirs = _pair("mlp")
    p_ours, p_theirs = ours.body[0].weight, theirs.body[0].weight
    _assert_same_norm(
        fct.clip_grad_norm_(p_ours, 0.1),
        torch.nn.utils.clip_grad_norm_(p_theirs, 0.1),
        torch.float32,
    )
    np.testing.assert_allclose(p_ours.grad.numpy(), p_theirs.grad.numpy(), rtol=1e-6)
    _assert_same_norm(
        fct.get_total_norm(p_ours.grad, 3.0),
        torch.nn.utils.get_total_norm(p_theirs.grad, 3.0),
        torch.float32,
    )
    gen_ours = (p for p in ours.parameters())
    gen_theirs = (p for p in theirs.parameters())
    _assert_same_norm(
        fct.clip_grad_norm_(gen_ours, 0.01),
        torch.nn.utils.clip_grad_norm_(gen_theirs, 0.01),
        torch.float32,
    )
    _assert_same_grads(ours, theirs, torch.float32)
    fct.clip_grad_value_(p_ours, 1e-4)
    torch.nn.utils.clip_grad_value_(p_theirs, 1e-4)
    _assert_same_grads(ours, theirs, torch.float32)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
def test_error_if_nonfinite_raises_like_torch_and_keeps_grads(norm_type, bad):
    ours, theirs = _pair("transformer")
    for m in (ours, theirs):
        m.head.weight.grad[0, 1] = bad
    before = _grads(ours)
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(
            theirs.parameters(), 0.05, norm_type, error_if_nonfinite=True
        )
    with pytest.raises(RuntimeError):
        fct.clip_grad_norm_(ours.parameters(), 0.05, norm_type, error_if_nonfinite=True)
    for g, p in zip(before, ours.parameters()):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    _assert_same_grads(ours, theirs, torch.float32)
    grads = [p.grad for p in ours.parameters() if p.grad is not None]
    with pytest.raises(RuntimeError):
        fct.get_total_norm(grads, norm_type, error_if_nonfinite=True)
    # without the flag, both propagate the non-finite norm into the gradients
    got = fct.clip_grad_norm_(ours.parameters(), 0.05, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05, norm_type)
    _assert_same_norm(got, expected, torch.float32)
    _assert_same_grads(ours, theirs, torch.float32)


def test_empty_parameters_return_zero_like_torch():
    for f_ours, f_theirs in [
        (fct.clip_grad_norm_, torch.nn.utils.clip_grad_norm_),
    ]:
        got, expected = f_ours([], 1.0), f_theirs([], 1.0)
        _assert_same_norm(got, expected, torch.float32)
    _assert_same_norm(fct.get_total_norm([]), torch.nn.utils.get_total_norm([]), torch.float32)
    no_grads = [torch.nn.Parameter(torch.ones(3))]
    _assert_same_norm(
        fct.clip_grad_norm_(no_grads, 1.0),
        torch.nn.utils.clip_grad_norm_(no_grads, 1.0),
        torch.float32,
    )
    with pytest.warns(UserWarning, match="empty generator"):
        expected = torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    with pytest.warns(UserWarning, match="empty generator"):
        got = fct.clip_grad_norm_((p for p in []), 1.0)
    _assert_same_norm(got, expected, torch.float32)


def test_clip_grad_norm_matches_float64_oracle():
    """Beyond parity: fastclip's float32 total is within 1e-6 of the exact float64 norm."""
    import reference as ref

    model = _model("transformer")
    grads = [p.grad.double().numpy() for p in model.parameters() if p.grad is not None]
    expected_total = ref.global_norm(grads)
    got = fct.clip_grad_norm_(model.parameters(), 0.05)
    assert abs(float(got) - expected_total) / expected_total < 1e-6
    coef = ref.coefficient(expected_total, 0.05, 1e-6)
    clipped = [p.grad.double().numpy() for p in model.parameters() if p.grad is not None]
    for g, c in zip(grads, clipped):
        np.testing.assert_allclose(c, g * coef, rtol=1e-6, atol=1e-30)


def test_in_place_bumps_the_autograd_version_counter():
    model = _model("mlp")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    versions = [g._version for g in grads]
    fct.clip_grad_norm_(model.parameters(), 1e-3)
    assert all(g._version > v for g, v in zip(grads, versions))
    w = torch.nn.Parameter(torch.ones(4))
    w2 = w * 2  # autograd saved w for the backward of w * w below
    y = (w * w2).sum()
    before = w._version
    with torch.no_grad():
        fastclip.clip_by_value_(w, -0.5, 0.5)
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()  # autograd notices, because the counter moved
    np.testing.assert_array_equal(w.detach().numpy(), np.full(4, 0.5, np.float32))


@pytest.mark.parametrize("norm_type", [0.0, -1.0, -0.5, -math.inf], ids=str)
@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clipped", "unchanged"])
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_torch_defined_norm_types_below_zero(kind, max_norm, norm_type):
    """norm_type <= 0 are not norms; fastclip.torch matches torch's values for them
    (computed with torch's vector_norm) and scales with its own kernel."""
    ours, theirs = _pair(kind)
    for m in (ours, theirs):  # exact zeros matter for 0 (counts) and -inf (min)
        last = m.head if kind == "transformer" else m.body[-1]
        last.weight.grad[0, :2] = 0.0
    got = fct.clip_grad_norm_(ours.parameters(), max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, norm_type)
    _assert_same_norm(got, expected, torch.float32)
    _assert_same_grads(ours, theirs, torch.float32)
    grads_ours = [p.grad for p in ours.parameters() if p.grad is not None]
    grads_theirs = [p.grad for p in theirs.parameters() if p.grad is not None]
    _assert_same_norm(
        fct.get_total_norm(grads_ours, norm_type),
        torch.nn.utils.get_total_norm(grads_theirs, norm_type),
        torch.float32,
    )
    with pytest.raises(ValueError, match="ord must be"):
        fastclip.global_norm(grads_ours, norm_type)  # the core keeps to real norms


def test_torch_defined_norm_type_error_if_nonfinite_keeps_grads():
    ours, theirs = _pair("mlp")
    for m in (ours, theirs):
        m.body[0].weight.grad[0, 0] = math.nan
    before = _grads(ours)
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05, -1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        fct.clip_grad_norm_(ours.parameters(), 0.05, -1.0, error_if_nonfinite=True)
    for g, p in zip(before, ours.parameters()):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)


def test_results_carry_no_autograd_history_as_documented():
    """fastclip is not differentiable (README "autograd"): outputs of inputs that
    require grad are plain tensors, with torch's values."""
    x = torch.tensor([3.0, 4.0], requires_grad=True)
    n = fastclip.norm(x)
    y = fastclip.clip_by_norm(x, 1.0, eps=0.0)
    assert not n.requires_grad and n.grad_fn is None
    assert not y.requires_grad and y.grad_fn is None
    torch.testing.assert_close(n, torch.linalg.vector_norm(x.detach()))
    torch.testing.assert_close(y, x.detach() / 5.0)
