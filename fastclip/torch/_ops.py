"""fastclip's torch entry points as torch custom operators, for ``torch.compile``.

Dynamo cannot trace into numba's dispatcher (torch 2.13 fails with
``AssertionError: exception table entry start instruction has no offset``), so
under ``torch.compile`` the public functions call these operators instead: each
is opaque to the compiler (``torch.library.custom_op``), declares the lists it
writes in place (``mutates_args``), and has a fake implementation that gives
the result's dtype, shape and device without computing it.  Their real
implementation is the eager code, so compiled and eager calls give the same
bits and raise the same errors.

The operators are registered when ``fastclip.torch`` is imported (never by
``import fastclip``).  Eager calls do not go through them: the dispatch of a
custom op costs microseconds per call, which the 1-tensor case would feel.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fastclip._validate import check_max_norm, scalar_value

__all__ = [
    "clipper_call",
    "fused_step",
    "register",
    "traced_clip_grad_norm_",
    "traced_clip_grad_value_",
    "traced_clip_grads_with_norm_",
    "traced_get_total_norm",
]

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _fake_norm(grads: list[Tensor]) -> Tensor:
    """The 0-d norm as torch returns it: the gradients' promoted (real) dtype, their device."""
    dtype = grads[0].dtype
    for g in grads[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    return grads[0].new_empty((), dtype=_REAL.get(dtype, dtype))


@torch.library.custom_op("fastclip::clip_grad_norm_", mutates_args=("grads",))
def clip_grad_norm(
    grads: list[Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool
) -> Tensor:
    """``clip_grad_norm_`` on a non-empty list of gradients (validated arguments)."""
    from . import _clip_grad as _cg  # at call time: _clip_grad imports this module

    if not _cg._torch_defined(norm_type):
        return _cg._norm_and_clip_fused(grads, max_norm, norm_type, error_if_nonfinite)
    total = _cg.get_total_norm(grads, norm_type, error_if_nonfinite)
    _cg._clip_grads_with_norm(grads, max_norm, total)
    return total


@clip_grad_norm.register_fake
def _(grads: list[Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool) -> Tensor:
    return _fake_norm(grads)


@torch.library.custom_op("fastclip::get_total_norm", mutates_args=())
def get_total_norm(tensors: list[Tensor], norm_type: float, error_if_nonfinite: bool) -> Tensor:
    """``get_total_norm`` on a non-empty list of tensors."""
    from . import _clip_grad as _cg

    total = _cg.get_total_norm(tensors, norm_type, error_if_nonfinite)
    # a custom op may not return one of its inputs: a 1-element list's norm_type<=0
    # result is a fresh tensor already, but the contract is checked, so make sure
    return total.clone() if any(total is t for t in tensors) else total


@get_total_norm.register_fake
def _(tensors: list[Tensor], norm_type: float, error_if_nonfinite: bool) -> Tensor:
    return _fake_norm(tensors)


@torch.library.custom_op("fastclip::clip_grads_with_norm_", mutates_args=("grads",))
def clip_grads_with_norm(grads: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """``clip_grads_with_norm_`` on a non-empty list of gradients."""
    from . import _clip_grad as _cg

    _cg._clip_grads_with_norm(grads, max_norm, total_norm)


@clip_grads_with_norm.register_fake
def _(grads: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
    return None


@torch.library.custom_op("fastclip::clip_grad_value_", mutates_args=("grads",))
def clip_grad_value(grads: list[Tensor], clip_value: float) -> None:
    """``clip_grad_value_`` on a non-empty list of gradients (validated ``clip_value``)."""
    from . import _clip_grad as _cg

    _cg._api.clip_values_(grads, -clip_value, clip_value)


@clip_grad_value.register_fake
def _(grads: list[Tensor], clip_value: float) -> None:
    return None


# What the public functions run while Dynamo traces them: the argument checks
# and the ``.grad`` extraction are plain Python (traced, and specialised on by
# Dynamo's guards), then one operator call gets the gradient list.


def _grads(parameters: Iterable[Tensor] | Tensor | torch.nn.Module) -> list[Tensor]:
    """``_clip_grad._grads`` written for Dynamo, which cannot call an ``attrgetter``.

    Without the empty-generator warning: ``warnings.warn`` breaks Dynamo's
    graph, and torch's own ``clip_grad_norm_`` compiled on an empty generator
    warns not either (measured, torch 2.13: no warning, no graph break).
    """
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    return [p.grad for p in parameters if p.grad is not None]


def traced_get_total_norm(
    tensors: Iterable[Tensor] | Tensor | torch.nn.Module, norm_type: float, error_if_nonfinite: bool
) -> Tensor:
    from . import _clip_grad as _cg

    if isinstance(tensors, torch.nn.Module):  # its parameters' gradients
        tensors = _grads(tensors)
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    norm_type = _cg._norm_type(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    return get_total_norm(tensors, norm_type, bool(error_if_nonfinite))


def traced_clip_grads_with_norm_(
    parameters: Iterable[Tensor] | Tensor, max_norm: float, total_norm: object
) -> None:

    max_norm = check_max_norm(max_norm)
    grads = _grads(parameters)
    if not grads:
        return
    if not isinstance(total_norm, Tensor):
        total_norm = torch.tensor(scalar_value(total_norm, "total_norm"), dtype=torch.float64)
    clip_grads_with_norm(grads, max_norm, total_norm)


def traced_clip_grad_norm_(
    parameters: Iterable[Tensor] | Tensor | torch.nn.Module,
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
) -> Tensor:
    from . import _clip_grad as _cg

    max_norm = check_max_norm(max_norm)
    norm_type = _cg._norm_type(norm_type)
    grads = _grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    return clip_grad_norm(grads, max_norm, norm_type, bool(error_if_nonfinite))


def traced_clip_grad_value_(parameters: Iterable[Tensor] | Tensor, clip_value: float) -> None:

    clip_value = scalar_value(clip_value, "clip_value", "clip_value=math.inf clamps nothing")
    if not clip_value >= 0:  # also NaN
        raise ValueError(f"clip_value must be >= 0 and not NaN, got {clip_value}")
    grads = _grads(parameters)
    if grads:
        clip_grad_value(grads, clip_value)


# The fused optimizers' step.  The operator gets every tensor the step reads or
# writes (parameters and existing state are declared mutated), plus a handle
# naming the optimizer, whose hyper-parameters it reads when it runs (a
# scheduler's new learning rate needs no recompilation) and into which it
# stores new state and ``last_total_norm``.  It writes only the tensors it was
# given: a backend that functionalises the op (copies the mutated inputs,
# copies the results back) stays correct.

_OPTIMIZERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


def register(optimizer: Any) -> int:
    """A handle for ``optimizer`` (held weakly) that the step operator accepts."""
    handle = next(_HANDLES)
    _OPTIMIZERS[handle] = optimizer
    return handle


@torch.library.custom_op("fastclip::fused_step_", mutates_args=("params", "states"))
def fused_step(
    handle: int,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[Tensor],
    group_sizes: list[int],
    layout: list[int],
) -> None:
    """One eager ``step()`` of the optimizer ``handle`` names, on the tensors given.

    ``params``/``grads``: the parameters with a gradient, group by group
    (``group_sizes`` of them per group); ``states``: their existing state
    tensors in the optimizer's ``STATE_KEYS`` order, ``layout[i]`` of them for
    parameter ``i`` (0: no state yet, the step creates it).
    """
    optimizer = _OPTIMIZERS.get(handle)
    if optimizer is None:
        raise RuntimeError("fastclip::fused_step_: the optimizer of this compiled step is gone")
    optimizer._step_on(params, grads, states, group_sizes, layout)


@fused_step.register_fake
def _(
    handle: int,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[Tensor],
    group_sizes: list[int],
    layout: list[int],
) -> None:
    return None


@torch.library.custom_op("fastclip::clipper_call_", mutates_args=("grads",))
def clipper_call(handle: int, grads: list[Tensor], params: list[Tensor]) -> Tensor:
    """``clipper(grads, params)`` of the ``ClippedOptimizer`` ``handle`` names.

    The clipper's own state (a ZClip's running mean, an AutoClip's history)
    is updated when the operator runs; its return value becomes the
    optimizer's ``last_total_norm``.  Returns ``last_step_skipped`` as a 0-d
    bool tensor.
    """
    optimizer = _OPTIMIZERS.get(handle)
    if optimizer is None:
        raise RuntimeError("fastclip::clipper_call_: the optimizer of this compiled step is gone")
    optimizer.last_total_norm = optimizer.clipper(grads, params)
    return torch.tensor(bool(getattr(optimizer.clipper, "last_step_skipped", False)))


@clipper_call.register_fake
def _(handle: int, grads: list[Tensor], params: list[Tensor]) -> Tensor:
    return torch.empty((), dtype=torch.bool)
