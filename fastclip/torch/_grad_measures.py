"""What ``BackwardNorm`` measures with: one gradient's measure, DTensor shards,
the norm of per-tensor norms, the result's dtype, and small checks.

Split from ``_backward_norm.py`` to keep each file short; used only by it.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from fastclip import _api, _dispatch
from fastclip.distributed._reduce import _resolve_group, dtensor_class, dtensor_local

from ._clip_grad import _result_dtype


class _Measure:
    """One gradient's norm and what it was taken of."""

    __slots__ = ("counts", "ref", "value", "version")

    def __init__(self, grad: torch.Tensor, version: int, value: Any, counts: bool) -> None:
        self.ref = weakref.ref(grad)
        self.version = version
        self.value = value  # a Python float (CPU) or a float64 0-d device tensor
        self.counts = counts  # False: a DTensor shard another rank counts (Replicate)


def _local(grad: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The tensor to measure and whether this rank counts it (DTensor placements)."""
    dtensor = dtensor_class()
    if dtensor is None or not isinstance(grad, dtensor):
        return grad, True
    return dtensor_local(grad)  # type: ignore[no-any-return]


def _combine(values: list[Any], ord_code: int, p: float, device: torch.device) -> Any:
    """The norm of the per-tensor norms (the norm of all gradients as one vector).

    Host floats give a host float; device values a float64 0-d device tensor.
    Scaled by the largest norm, so float64 norms near 1e200 do not overflow.
    """
    if all(type(v) is float for v in values):
        if any(math.isnan(v) for v in values):
            return math.nan
        m = max(values)
        if ord_code == 0 or m == 0.0 or math.isinf(m):
            return m
        s = math.fsum((v / m) ** p for v in values)
        return m * (math.sqrt(s) if ord_code == 2 else s if ord_code == 1 else s ** (1.0 / p))
    norms = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    m = norms.amax()  # propagates NaN
    if ord_code == 0:
        return m
    ok = torch.isfinite(m) & (m > 0)
    scale = torch.where(ok, m, torch.ones_like(m))
    ssum = torch.sum(torch.pow(norms / scale, p))
    root = torch.sqrt(ssum) if ord_code == 2 else ssum if ord_code == 1 else ssum ** (1.0 / p)
    return torch.where(ok, scale * root, m)


class _Named(list):  # type: ignore[type-arg]
    """Gradients with their parameters' names, for ``_nonfinite_error``."""

    def __init__(self, grads: list[torch.Tensor], names: list[str] | None) -> None:
        super().__init__(grads)
        self.names = None if names is None else tuple(names)


def _norm_of(tensors: list[torch.Tensor], ord_code: int, p: float, norm_type: float) -> Any:
    """The global norm of ``tensors`` (one launch per dtype): an exact float64 host
    float on the CPU route, else a float64 0-d tensor on their device (fastclip's
    CUDA kernels, on torch's current stream)."""
    exact = _dispatch.backend_for(tensors).norm64(tensors, ord_code, p)
    if exact is not None:
        return float(exact)
    return _api.global_norm(tensors, norm_type).detach().to(torch.float64)


def _result(grads: list[torch.Tensor], total: Any) -> torch.Tensor:
    """The total norm as torch returns it: the promoted dtype of the gradients
    (of their local shards), on their device."""
    locals_ = [_local(g)[0] for g in grads]
    wide = any(a.dtype in (torch.float64, torch.complex128) for a in locals_)
    dtype = _result_dtype(locals_, torch.float64 if wide else torch.float32)
    if isinstance(total, torch.Tensor):
        return total.to(dtype)
    return torch.tensor(total, dtype=dtype, device=locals_[0].device)


def _unscaled(scaler: Any) -> bool:
    """Whether ``scaler.unscale_`` ran since its last ``update()`` (for any optimizer)."""
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, "_per_optimizer_states", {})
    return any(state.get("stage") is OptState.UNSCALED for state in states.values())


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value))
    return math.isfinite(value)


def _mesh_group(grads: list[torch.Tensor]) -> Any:
    """The group :func:`fastclip.distributed.global_norm` reduces DTensors over:
    their mesh's when it is one 1-D mesh, else None (the world)."""
    return _resolve_group(None, grads)
