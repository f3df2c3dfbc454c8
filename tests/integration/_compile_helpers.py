"""Shared pieces of the torch.compile tests (``test_torch_compile*.py``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def model(seed: int = 0, step: int = 0) -> torch.nn.Module:
    """A small MLP with one backward pass's gradients (one parameter has none)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model.unused = torch.nn.Parameter(torch.ones(3))
    backward(model, step)
    return model


def backward(model: torch.nn.Module, step: int) -> None:
    torch.manual_seed(100 + step)
    model.zero_grad()
    (model(torch.randn(5, 8)).square().sum() * 3).backward()


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def assert_close(a, b, exact: bool) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def graph_breaks(step) -> int:
    """``torch._dynamo.explain(step)().graph_break_count``, from a fresh Dynamo."""
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(step)().graph_break_count
    torch._dynamo.reset()
    return breaks
