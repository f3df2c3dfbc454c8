"""``fastclip.torch.grad_norm`` against Lightning's formula, written here in torch.

Lightning is not a dependency.  Its ``lightning.pytorch.utilities.grad_norm``
(``src/lightning/pytorch/utilities/grads.py``) reads ``p = float(norm_type)``,
refuses ``p <= 0`` with a ValueError, takes ``p.grad.norm(p)`` for each named
parameter with a gradient under the key ``grad_{p}_norm{separator}{name}``,
and when there is at least one adds ``grad_{p}_norm_total``: the p-norm of
``torch.tensor`` of those values.  ``_lightning`` below is that formula; the
float64 NumPy oracle checks both.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref

torch = pytest.importorskip("torch")

import fastclip  # noqa: E402
import fastclip.torch as fct  # noqa: E402

_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _lightning(module, norm_type, group_separator="/"):
    """Lightning's grad_norm, as its documentation and source define it."""
    p = float(norm_type)
    if p <= 0:
        raise ValueError(f"`norm_type` must be a positive number or 'inf' (infinity norm). Got {p}")
    out = {}
    for name, param in module.named_parameters():
        if param.grad is not None:
            out[f"grad_{p}_norm{group_separator}{name}"] = torch.linalg.vector_norm(param.grad, p)
    if out:
        out[f"grad_{p}_norm_total"] = torch.linalg.vector_norm(torch.tensor(list(out.values())), p)
    return out


def _model(dtype=torch.float32, second=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Linear(3, 2)
    )
    model.to(dtype)
    if second is not None:
        model[2].to(second)
    x = torch.randn(4, 5, dtype=dtype)
    h = model[1](model[0](x))
    h = model[3](model[2](h.to(model[2].weight.dtype)).to(dtype))
    h.float().sum().backward()
    model[3].bias.grad = None  # no gradient: no key
    return model


def _compare(got, expected):
    assert list(got) == list(expected)  # same keys, same order
    for key, value in expected.items():
        g = got[key]
        assert g.shape == () and g.dtype == value.dtype and g.device == value.device, key
        rtol = _RTOL[value.dtype]
        if key.endswith("_total"):  # Lightning's is built from values rounded to each dtype
            rtol = max(_RTOL[v.dtype] for v in expected.values())
        np.testing.assert_allclose(g.double().item(), value.double().item(), rtol=rtol, err_msg=key)


@pytest.mark.parametrize("norm_type", [2, 1, 3, 2.5, math.inf, "inf", "2"])
@pytest.mark.parametrize("separator", ["/", "."])
def test_matches_lightning(norm_type, separator):
    model = _model()
    got = fct.grad_norm(model, norm_type, group_separator=separator)
    _compare(got, _lightning(model, norm_type, separator))
    # and the float64 oracle, parameter by parameter and in total
    p = float(norm_type)
    grads = [
        (n, q.grad.double().numpy()) for n, q in model.named_parameters() if q.grad is not None
    ]
    for name, g in grads:
        np.testing.assert_allclose(
            got[f"grad_{p}_norm{separator}{name}"].item(), ref.norm(g, p), rtol=1e-6
        )
    total = ref.global_norm([g for _, g in grads], p)
    np.testing.assert_allclose(got[f"grad_{p}_norm_total"].item(), total, rtol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "second"),
    [
        (torch.float64, None),
        (torch.float16, None),
        (torch.bfloat16, None),
        (torch.float32, torch.float64),
    ],
    ids=["float64", "float16", "bfloat16", "float32+float64"],
)
def test_dtypes_follow_lightning(dtype, second):
    model = _model(dtype, second)
    _compare(fct.grad_norm(model, 2), _lightning(model, 2))


def test_no_gradients_is_an_empty_dict():
    model = torch.nn.Linear(3, 2)
    assert fct.grad_norm(model, 2) == {} == _lightning(model, 2)


@pytest.mark.parametrize("norm_type", [0, -1, -math.inf, "0"])
def test_non_positive_norm_type_is_refused_like_lightning(norm_type):
    model = _model()
    with pytest.raises(ValueError) as ours:
        fct.grad_norm(model, norm_type)
    with pytest.raises(ValueError) as theirs:
        _lightning(model, norm_type)
    assert str(ours.value) == f"fastclip.torch.grad_norm: {theirs.value}"  # Lightning's words


def test_one_global_norm_call_and_nothing_modified(monkeypatch):
    """All norms come from one fastclip.global_norm(..., per_array=True) call (one
    launch per dtype); the gradients are not touched."""
    model = _model(torch.float32, torch.float64)
    before = [q.grad.clone() for q in model.parameters() if q.grad is not None]
    calls = []
    real = fastclip._api.global_norm

    def counting(*args, **kwargs):
        calls.append(kwargs.get("per_array"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fastclip._api, "global_norm", counting)
    fct.grad_norm(model, 2)
    assert calls == [True]
    after = [q.grad for q in model.parameters() if q.grad is not None]
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nonfinite_gradient_propagates_like_lightning():
    model = _model()
    model[0].weight.grad[0, 0] = math.nan
    got, expected = fct.grad_norm(model, 2), _lightning(model, 2)
    assert math.isnan(got["grad_2.0_norm/0.weight"].item())
    assert math.isnan(got["grad_2.0_norm_total"].item()) == math.isnan(
        expected["grad_2.0_norm_total"].item()
    )


def test_exported_and_public_path():
    assert "grad_norm" in fct.__all__
    assert fct.grad_norm.__module__ == "fastclip.torch"
