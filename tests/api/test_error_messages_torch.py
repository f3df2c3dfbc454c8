"""The error messages of ``fastclip.torch`` and ``fastclip.distributed``: the public
name first, then the argument, then the fix (see ``test_error_messages.py``, whose
``message`` helper checks the exception's exact class and that the inputs were not
modified)."""

from __future__ import annotations

import math
import re

import pytest

import fastclip
from tests.api.test_error_messages import _param, f32, message

torch = pytest.importorskip("torch")
fct = pytest.importorskip("fastclip.torch")


def test_torch_drop_in_given_numpy_arrays_says_use_the_array_api() -> None:
    a = f32(3.0, 4.0)
    text = message(TypeError, lambda: fct.clip_grad_norm_([a], 1.0), a)
    assert text.startswith(
        "fastclip.torch.clip_grad_norm_: parameters[0] must be a torch tensor (parameters must "
        "be torch tensors: their .grad is clipped), got numpy.ndarray"
    )
    assert text.endswith(
        "use the array API: fastclip.clip_by_global_norm_(grads, max_norm) / "
        "fastclip.clip_by_value_(grads, -clip_value, clip_value)"
    )
    p = _param(3.0, 4.0)
    text = message(TypeError, lambda: fct.clip_grad_value_([p, a], 1.0), p.grad, a)
    assert text.startswith("fastclip.torch.clip_grad_value_: parameters[1] must be a torch tensor")


def test_torch_get_total_norm_given_numpy_says_global_norm() -> None:
    text = message(TypeError, lambda: fct.get_total_norm([f32(3.0, 4.0)]))
    assert text == (
        "fastclip.torch.get_total_norm: tensors[0] must be a torch tensor, got numpy.ndarray; "
        "for NumPy (or any Array API) arrays use the array API: fastclip.global_norm(arrays, ord)"
    )


def test_torch_scalar_arguments_are_named() -> None:
    p = _param(3.0, 4.0)
    for exc, call, expected in [
        (
            ValueError,
            lambda: fct.clip_grad_norm_([p], -1.0),
            "fastclip.torch.clip_grad_norm_: max_norm must be >= 0 and not NaN, got -1.0",
        ),
        (
            ValueError,
            lambda: fct.clip_grad_norm_([p], 1.0, math.nan),
            "fastclip.torch.clip_grad_norm_: norm_type must be a real number p > 0 or inf",
        ),
        (
            ValueError,
            lambda: fct.clip_grad_value_([p], -1.0),
            "fastclip.torch.clip_grad_value_: clip_value must be >= 0 and not NaN, got -1.0",
        ),
        (
            TypeError,
            lambda: fct.clip_grads_with_norm_([p], 1.0, "5"),
            "fastclip.torch.clip_grads_with_norm_: total_norm must be a real number or a 0-d array, got str",
        ),
    ]:
        assert message(exc, call, p.grad).startswith(expected)


def test_torch_inner_call_is_not_named_twice() -> None:
    """clip_grad_norm_ runs fastclip.clip_by_global_norm_: the user called the former."""
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(1).expand(3)  # elements sharing memory: refused by the inner call
    text = message(ValueError, lambda: fct.clip_grad_norm_([p], 1.0), p.grad)
    assert text.startswith("fastclip.torch.clip_grad_norm_: got an array whose elements share")
    assert text.count("fastclip.torch.clip_grad_norm_") == 1
    assert "fastclip.clip_by_global_norm_:" not in text


def test_grad_norm_is_lightnings_words_after_the_name() -> None:
    text = message(ValueError, lambda: fct.grad_norm(torch.nn.Linear(2, 1), 0))
    assert text == (
        "fastclip.torch.grad_norm: `norm_type` must be a positive number or 'inf' (infinity "
        "norm). Got 0.0"
    )


def test_torch_classes_name_themselves() -> None:
    p = _param(3.0, 4.0)
    for exc, call, expected in [
        (
            ValueError,
            lambda: fct.FusedSGD([p], lr=0.1, norm_in_backward=True),
            "fastclip.torch.FusedSGD: norm_in_backward=True needs max_norm",
        ),
        (
            TypeError,
            lambda: fct.ClippedOptimizer(3, fastclip.ZClip()),
            "fastclip.torch.ClippedOptimizer: optimizer must be a torch.optim.Optimizer (e.g. torch.optim.AdamW(params)), got builtins.int",
        ),
        (
            TypeError,
            lambda: fct.BackwardNorm([f32(1.0)]),
            "fastclip.torch.BackwardNorm: parameters[0] must be a torch tensor",
        ),
        (
            ValueError,
            lambda: fct.BackwardNorm([p], 0),
            "fastclip.torch.BackwardNorm: norm_type must be a norm (norm_type > 0 or inf), got 0.0; use fastclip.torch.get_total_norm for norm_type <= 0",
        ),
        (
            ValueError,
            lambda: fct.BackwardNorm([p]).clip_(-1.0),
            "fastclip.torch.BackwardNorm.clip_: max_norm must be >= 0",
        ),
    ]:
        assert message(exc, call, p.grad).startswith(expected)


def test_fused_step_names_the_optimizers_step() -> None:
    q = torch.ones(2, dtype=torch.complex64, requires_grad=True)
    q.grad = torch.ones(2, dtype=torch.complex64)
    opt = fct.FusedAdamW([q])
    text = message(TypeError, opt.step, q, q.grad)
    assert re.match(
        r"fastclip\.torch\.FusedAdamW\.step: .*complex parameters are not supported", text
    )
    assert opt.state == {}


def test_user_closure_errors_are_not_renamed() -> None:
    opt = fct.FusedSGD([_param(1.0)], lr=0.1)

    def closure() -> None:
        raise ValueError("the user's own error")

    assert message(ValueError, lambda: opt.step(closure)) == "the user's own error"


def test_array_api_in_place_on_a_parameter_keeps_the_runtime_error() -> None:
    """torch's in-place rule stays a RuntimeError; it names the function and the tensor."""
    w = torch.ones(3, requires_grad=True)
    text = message(RuntimeError, lambda: fastclip.clip_by_global_norm_([w], 1.0), w)
    assert text.startswith(
        "fastclip.clip_by_global_norm_: arrays[0] is a leaf tensor that requires grad"
    )
    assert "fastclip.torch.clip_grad_norm_(model.parameters(), max_norm)" in text
    text = message(RuntimeError, lambda: fastclip.clip_by_norm_(w, 1.0), w)
    assert text.startswith("fastclip.clip_by_norm_: x is a leaf tensor that requires grad")


def test_distributed_entry_points_are_named() -> None:
    from fastclip import distributed

    a = f32(3.0, 4.0)
    text = message(ValueError, lambda: distributed.clip_by_global_norm_([a], -1.0), a)
    assert text.startswith("fastclip.distributed.clip_by_global_norm_: ")
