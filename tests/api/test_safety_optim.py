"""Data safety of the fused optimizers: a refused step changes nothing, validation comes
before the non-finite decision, the fused norm is the core's, torch's argument rules.

This file owns the refusals and argument checks of the fused steps and optimizers;
their values are in test_optim.py.

Every refused call is checked byte for byte (params, grads, state) and on the
optimizer's ``state_dict``; every accepted one against ``torch.optim`` or the
float64 transcriptions of ``tests/reference.py``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import reference

from fastclip import NonFiniteNormError
from fastclip.optim import adamw_step_, sgd_step_

torch = pytest.importorskip("torch")

from fastclip.torch import FusedAdamW, FusedSGD  # noqa: E402

POLICIES = ["propagate", "error", "skip"]


def _bytes(arrays):
    out = []
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.detach()
            a = a.view(torch.uint8) if a.dim() else a.reshape(1).view(torch.uint8)
            out.append(a.numpy().tobytes())
        else:
            out.append(np.ascontiguousarray(a).tobytes())
    return out


def _state_bytes(opt):
    """The optimizer's state_dict with every tensor replaced by its bytes."""
    sd = opt.state_dict()
    state = {
        k: {name: (str(t.dtype), _bytes([t])[0]) for name, t in v.items()}
        for k, v in sd["state"].items()
    }
    return state, copy.deepcopy(sd["param_groups"])


def _snapshot(opt, tensors):
    return _state_bytes(opt), _bytes(tensors), [t.grad is None for t in tensors]


def _grads(tensors):
    return [t.grad for t in tensors if t.grad is not None]


# ------------------------------------------------ 1. a refused step changes nothing


def _two_groups(kind):
    """A float32 group and a second group whose parameter cannot be stepped."""
    torch.manual_seed(0)
    good = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]
    bad = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    for p in (*good, bad):
        p.grad = torch.randn_like(p)
    return good, bad


@pytest.mark.parametrize("amsgrad_second", [False, True])  # one launch, or two
def test_fused_adamw_refused_group_changes_nothing(amsgrad_second) -> None:
    good, bad = _two_groups("complex")
    groups = [{"params": good}, {"params": [bad], "amsgrad": amsgrad_second}]
    opt = FusedAdamW(groups, lr=0.1, max_norm=1.0)
    ref = torch.optim.AdamW([{"params": [p.detach().clone() for p in good]}], lr=0.1)
    # one good step first, so existing state (and its step count) is at stake too
    bad_grad = bad.grad
    bad.grad = None
    for q, p in zip(ref.param_groups[0]["params"], good):
        q.grad = p.grad.clone()
    opt.step()
    torch.nn.utils.clip_grad_norm_(ref.param_groups[0]["params"], 1.0)
    ref.step()
    bad.grad = bad_grad
    before = _snapshot(opt, [*good, bad, *_grads([*good, bad])])
    for _ in range(2):  # two refused steps: the step count stays at 1
        with pytest.raises(TypeError, match="complex"):
            opt.step()
        assert _snapshot(opt, [*good, bad, *_grads([*good, bad])]) == before
    assert float(opt.state[good[0]]["step"]) == 1.0
    assert bad not in opt.state or not opt.state[bad]
    # without the bad gradient the next step is torch's second step
    bad.grad = None
    for q, p in zip(ref.param_groups[0]["params"], good):
        q.grad = p.grad.clone()
    opt.step()
    torch.nn.utils.clip_grad_norm_(ref.param_groups[0]["params"], 1.0)
    ref.step()
    for q, p in zip(ref.param_groups[0]["params"], good):
        torch.testing.assert_close(p.detach(), q, rtol=2e-6, atol=1e-7)
    assert float(opt.state[good[0]]["step"]) == 2.0


def test_fused_adamw_first_step_refused_creates_no_state() -> None:
    good, bad = _two_groups("complex")
    opt = FusedAdamW([{"params": good}, {"params": [bad]}], lr=0.1)
    before = _snapshot(opt, [*good, bad, *_grads([*good, bad])])
    with pytest.raises(TypeError, match="complex"):
        opt.step()
    assert _snapshot(opt, [*good, bad, *_grads([*good, bad])]) == before
    assert not any(opt.state.get(p) for p in (*good, bad))


def test_fused_sgd_refused_group_changes_nothing() -> None:
    good, bad = _two_groups("complex")
    opt = FusedSGD([{"params": good}, {"params": [bad]}], lr=0.1, momentum=0.9)
    before = _snapshot(opt, [*good, bad, *_grads([*good, bad])])
    with pytest.raises(TypeError, match="complex"):
        opt.step()
    assert _snapshot(opt, [*good, bad, *_grads([*good, bad])]) == before
    assert not any(opt.state.get(p) for p in (*good, bad))


def test_fused_sgd_shared_memory_leaves_no_unset_buffer() -> None:
    base = torch.arange(10.0)
    p1 = torch.nn.Parameter(base[0:6])  # Parameter shares the storage: they overlap
    p2 = torch.nn.Parameter(base[3:9])
    p1.grad, p2.grad = torch.full((6,), 0.5), torch.full((6,), -0.25)
    opt = FusedSGD([p1, p2], lr=0.1, momentum=0.9)
    before = _snapshot(opt, [p1, p2, p1.grad, p2.grad])
    with pytest.raises(ValueError, match="share"):
        opt.step()
    assert _snapshot(opt, [p1, p2, p1.grad, p2.grad]) == before
    assert "momentum_buffer" not in opt.state.get(p1, {})
    # the next valid step is torch's *first* step: the buffer is set to the gradient
    p2.grad = None
    q = p1.detach().clone().requires_grad_()
    q.grad = p1.grad.clone()
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.step()
        ref.step()
        torch.testing.assert_close(p1.detach(), q.detach(), rtol=0, atol=0)
        torch.testing.assert_close(
            opt.state[p1]["momentum_buffer"], ref.state[q]["momentum_buffer"]
        )


# ------------------------------- 2. validation before the "skip" decision


def _nan_grads(n=5):
    g = np.ones(n, np.float32)
    g[1] = np.nan
    return g


@pytest.mark.parametrize("which", ["adamw", "sgd"])
@pytest.mark.parametrize("fault", ["shape", "read_only", "dtype"])
def test_skip_with_nan_norm_still_validates(which, fault) -> None:
    p = [np.ones(5, np.float32), np.ones(3, np.float32)]
    g = [_nan_grads(), np.ones(3, np.float32)]
    m = [np.zeros(5, np.float32), np.zeros(3, np.float32)]
    v = [np.zeros(5, np.float32), np.zeros(3, np.float32)]
    if fault == "shape":
        m[1] = np.zeros(4, np.float32)
        err = ValueError
    elif fault == "read_only":
        p[1].flags.writeable = False
        err = ValueError
    else:
        m[1] = np.zeros(3, np.float64)
        err = TypeError
    before = _bytes(p + g + m + v)
    with pytest.raises(err):
        if which == "adamw":
            adamw_step_(p, g, m, v, step=1, max_norm=1.0, nonfinite="skip")
        else:
            sgd_step_(p, g, m, momentum=0.9, first_step=False, max_norm=1.0, nonfinite="skip")
    assert _bytes(p + g + m + v) == before
    # a valid call with the same NaN norm is skipped: nothing written, the norm returned
    p, m = [np.ones(5, np.float32)], [np.zeros(5, np.float32)]
    v = [np.zeros(5, np.float32)]
    before = _bytes(p + m + v)
    if which == "adamw":
        norm = adamw_step_(p, g[:1], m, v, step=1, max_norm=1.0, nonfinite="skip")
    else:
        norm = sgd_step_(p, g[:1], m, momentum=0.9, max_norm=1.0, nonfinite="skip")
    assert math.isnan(float(norm)) and math.isnan(float(reference.global_norm(g[:1])))
    assert _bytes(p + m + v) == before


@pytest.mark.parametrize("cls", [FusedAdamW, FusedSGD])
def test_fused_skip_with_nan_norm_still_validates(cls) -> None:
    good, bad = _two_groups("complex")
    good[0].grad[0] = float("nan")
    kw = {"momentum": 0.9} if cls is FusedSGD else {}
    opt = cls([{"params": good}, {"params": [bad]}], lr=0.1, max_norm=1.0, nonfinite="skip", **kw)
    before = _snapshot(opt, [*good, bad, *_grads([*good, bad])])
    with pytest.raises(TypeError, match="complex"):
        opt.step()
    assert _snapshot(opt, [*good, bad, *_grads([*good, bad])]) == before
    assert opt.last_step_skipped is False and opt.last_total_norm is None
    bad.grad = None  # now valid: skipped on the NaN norm, nothing written
    before = _snapshot(opt, [*good, *_grads(good)])
    opt.step()
    assert opt.last_step_skipped is True
    assert _snapshot(opt, [*good, *_grads(good)]) == before


# --------------------- 3. the fused norm is the core's (|g| ~ 1e200, 1e-200)


def _huge_case(scale, shapes=((4,), (3,))):
    rng = np.random.default_rng(1)
    P = [rng.normal(size=s) for s in shapes]
    G = [rng.normal(size=s) * scale for s in shapes]
    return P, G


@pytest.mark.parametrize("norm_type", [2.0, 3.0])
@pytest.mark.parametrize("scale", [1e200, 1e-200])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_fused_functional_norm_of_extreme_gradients(lib, policy, scale, norm_type) -> None:
    P, G = _huge_case(scale)
    conv = np.array if lib == "numpy" else (lambda a: torch.tensor(a, dtype=torch.float64))
    true = float(reference.global_norm(G, norm_type))
    assert math.isfinite(true) and true > 0
    coef = float(reference.coefficient(true, 1.0, 1e-6))
    # AdamW
    p, g = [conv(a) for a in P], [conv(a) for a in G]
    m, v = [conv(np.zeros_like(a)) for a in P], [conv(np.zeros_like(a)) for a in P]
    norm = adamw_step_(
        p, g, m, v, step=1, lr=0.1, max_norm=1.0, norm_type=norm_type, nonfinite=policy
    )
    assert float(norm) == pytest.approx(true, rel=1e-13, abs=0)
    for i in range(len(P)):
        ref_p, ref_m, ref_v, _ = reference.adamw_step(
            P[i], G[i], np.zeros_like(P[i]), np.zeros_like(P[i]), None, 1, 0.1, 0.9, 0.999,
            1e-8, 1e-2, coef,
        )  # fmt: skip
        np.testing.assert_allclose(np.asarray(p[i]), ref_p, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(m[i]), ref_m, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(v[i]), ref_v, rtol=1e-12)
    # SGD with momentum
    p, g = [conv(a) for a in P], [conv(a) for a in G]
    b = [conv(np.zeros_like(a)) for a in P]
    norm = sgd_step_(
        p, g, b, lr=0.1, momentum=0.9, first_step=True, max_norm=1.0, norm_type=norm_type,
        nonfinite=policy,
    )  # fmt: skip
    assert float(norm) == pytest.approx(true, rel=1e-13, abs=0)
    for i in range(len(P)):
        ref_p, ref_b = reference.sgd_step(P[i], G[i], None, 0.1, 0.9, 0.0, 0.0, False, True, coef)
        np.testing.assert_allclose(np.asarray(p[i]), ref_p, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(b[i]), ref_b, rtol=1e-12)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cls", [FusedAdamW, FusedSGD])
def test_fused_optimizers_clip_huge_gradients_by_the_true_norm(cls, policy) -> None:
    P, G = _huge_case(1e200)
    true = float(reference.global_norm(G))
    coef = float(reference.coefficient(true, 1.0, 1e-6))
    params = [torch.nn.Parameter(torch.tensor(a)) for a in P]
    for prm, a in zip(params, G):
        prm.grad = torch.tensor(a)
    kw = {"momentum": 0.9} if cls is FusedSGD else {}
    opt = cls(params, lr=0.1, max_norm=1.0, nonfinite=policy, **kw)
    opt.step()
    assert opt.last_step_skipped is False
    assert opt.last_total_norm.dtype == torch.float64  # float32 would report inf
    assert float(opt.last_total_norm) == pytest.approx(true, rel=1e-13, abs=0)
    for i, prm in enumerate(params):
        if cls is FusedAdamW:
            ref_p = reference.adamw_step(
                P[i], G[i], np.zeros_like(P[i]), np.zeros_like(P[i]), None, 1, 0.1, 0.9,
                0.999, 1e-8, 1e-2, coef,
            )[0]  # fmt: skip
        else:
            ref_p = reference.sgd_step(P[i], G[i], None, 0.1, 0.9, 0.0, 0.0, False, True, coef)[0]
        np.testing.assert_allclose(prm.detach().numpy(), ref_p, rtol=1e-12)
        np.testing.assert_array_equal(prm.grad.numpy(), G[i])  # gradients stay unclipped


# ------------------------------------------- 4. torch.optim.AdamW's argument rules


BAD_ADAMW = [
    dict(betas=(1.0, 0.999)),
    dict(betas=(0.9, 1.0)),
    dict(betas=(-0.1, 0.999)),
    dict(betas=(0.9, float("nan"))),
    dict(lr=-1e-3),
    dict(lr=float("nan")),
    dict(eps=-1e-8),
    dict(weight_decay=-0.1),
]


@pytest.mark.parametrize("bad", BAD_ADAMW, ids=lambda d: repr(d))
def test_adamw_arguments_follow_torch(bad) -> None:
    with pytest.raises(ValueError) as torch_err:
        torch.optim.AdamW([torch.zeros(2, requires_grad=True)], **bad)
    p, g = [np.ones(3, np.float32)], [np.ones(3, np.float32)]
    m, v = [np.zeros(3, np.float32)], [np.zeros(3, np.float32)]
    before = _bytes(p + g + m + v)
    with pytest.raises(ValueError) as ours:
        adamw_step_(p, g, m, v, step=1, **bad)
    # torch's own words, after the public name of the call
    assert str(ours.value) == f"fastclip.optim.adamw_step_: {torch_err.value}"
    assert _bytes(p + g + m + v) == before
    with pytest.raises(ValueError) as fused:
        FusedAdamW([torch.zeros(2, requires_grad=True)], **bad)
    assert str(fused.value) == f"fastclip.torch.FusedAdamW: {torch_err.value}"


def test_adamw_edge_arguments_torch_accepts() -> None:
    """beta1 = 0 and lr = eps = weight_decay = 0 are legal in torch: same update."""
    rng = np.random.default_rng(2)
    P, G = rng.normal(size=6), rng.normal(size=6)
    for kw in (dict(betas=(0.0, 0.0)), dict(lr=0.0, eps=0.0, weight_decay=0.0)):
        q = torch.tensor(P, requires_grad=True)
        q.grad = torch.tensor(G)
        torch.optim.AdamW([q], **kw).step()
        p = [P.copy()]
        m, v = [np.zeros(6)], [np.zeros(6)]
        adamw_step_(p, [G.copy()], m, v, step=1, **kw)
        np.testing.assert_allclose(p[0], q.detach().numpy(), rtol=1e-14)


BAD_SGD = [dict(lr=-0.1), dict(momentum=-0.5), dict(weight_decay=-1.0)]


@pytest.mark.parametrize("bad", BAD_SGD, ids=lambda d: repr(d))
def test_sgd_arguments_follow_torch(bad) -> None:
    with pytest.raises(ValueError) as torch_err:
        torch.optim.SGD([torch.zeros(2, requires_grad=True)], **bad)
    p, g = [np.ones(3, np.float32)], [np.ones(3, np.float32)]
    b = [np.zeros(3, np.float32)]
    before = _bytes(p + g + b)
    with pytest.raises(ValueError) as ours:
        sgd_step_(p, g, b, **bad)
    assert str(ours.value) == f"fastclip.optim.sgd_step_: {torch_err.value}"
    assert _bytes(p + g + b) == before


def test_nonfinite_error_refusal_leaves_state() -> None:
    """``nonfinite="error"`` raises after validation, before any write or state change."""
    good, _ = _two_groups("complex")
    good[0].grad[0] = float("inf")
    for cls in (FusedAdamW, FusedSGD):
        kw = {"momentum": 0.9} if cls is FusedSGD else {}
        opt = cls(good, lr=0.1, max_norm=1.0, nonfinite="error", **kw)
        before = _snapshot(opt, [*good, *_grads(good)])
        with pytest.raises(NonFiniteNormError):
            opt.step()
        assert _snapshot(opt, [*good, *_grads(good)]) == before
        assert not any(opt.state.get(p) for p in good)


def test_fused_steps_keep_coefficients_below_float32_range() -> None:
    """float32 gradients of 1e30 clipped to 1e-30: the factor (~6e-61) is below
    float32's range but the clipped gradients (~6e-31) are not; they must reach
    the update (they used to be flushed to 0 with the factor)."""
    g = [np.full(3, 1e30, np.float32)]
    c = 1e-30
    g64 = g[0].astype(np.float64) * (c / (np.sqrt(3) * 1e30 + 1e-6))
    p = [np.zeros(3, np.float32)]
    sgd_step_(p, g, lr=1.0, max_norm=c)
    np.testing.assert_allclose(p[0], (-g64).astype(np.float32), rtol=1e-6)
    p, m, v = [np.zeros(3, np.float32)], [np.zeros(3, np.float32)], [np.zeros(3, np.float32)]
    adamw_step_(p, g, m, v, step=1, lr=0.1, max_norm=c)
    want_p, want_m, _, _ = reference.adamw_step(
        np.zeros(3), g64, np.zeros(3), np.zeros(3), None, 1, 0.1, 0.9, 0.999, 1e-8, 0.01, 1.0
    )
    np.testing.assert_allclose(m[0], want_m.astype(np.float32), rtol=1e-6)
    assert np.all(m[0] != 0)
    np.testing.assert_allclose(p[0], want_p.astype(np.float32), rtol=1e-5)


# ------------------------------------ argument checks of the steps and optimizers


def test_errors() -> None:
    with pytest.raises(ValueError):
        FusedAdamW([torch.nn.Parameter(torch.ones(1))], capturable=True)
    with pytest.raises(ValueError):
        FusedSGD([torch.nn.Parameter(torch.ones(1))], nesterov=True)
    with pytest.raises(ValueError):
        sgd_step_([np.ones(2)], [np.ones(2)], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError):
        adamw_step_([np.ones(2)], [np.ones(3)], [np.ones(2)], [np.ones(2)], step=1)
    with pytest.raises(TypeError):
        adamw_step_([np.ones(2, np.float32)], [np.ones(2)], [np.ones(2)], [np.ones(2)], step=1)
    with pytest.raises(ValueError):
        adamw_step_([np.ones(2)], [np.ones(2)], [np.ones(2)], [np.ones(2)], step=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(step="a"), "step"),
        (dict(step=[1, "a"]), "step"),
        (dict(step=1, lr="a"), "lr"),
        (dict(step=1, eps=None), "eps"),
        (dict(step=1, weight_decay="0.1"), "weight_decay"),
        (dict(step=1, betas="ab"), "betas"),
        (dict(step=1, betas=(0.9,)), "betas"),
        (dict(step=1, betas=(0.9, "x")), "betas"),
    ],
)
def test_adamw_step_bad_hyperparameter_types_name_the_argument(kwargs, match) -> None:
    """A TypeError naming the argument (not float()'s message), before any write."""
    # params, grads, exp_avgs, exp_avg_sqs: two arrays each
    arrays = [[np.array([1.0, -2.0], np.float32) * (k + i) for i in range(2)] for k in range(4)]
    before = [[x.copy() for x in a] for a in arrays]
    with pytest.raises(TypeError, match=match):
        adamw_step_(*arrays, **kwargs)
    for a, b in zip(arrays, before):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_sgd_step_bad_hyperparameter_types_name_the_argument() -> None:
    p, g = [np.ones(2, np.float32)], [np.ones(2, np.float32)]
    for kwargs, match in ((dict(lr="a"), "lr"), (dict(lr=0.1, momentum="a"), "momentum")):
        with pytest.raises(TypeError, match=match):
            sgd_step_(p, g, **kwargs)
        np.testing.assert_array_equal(p[0], np.ones(2, np.float32))
