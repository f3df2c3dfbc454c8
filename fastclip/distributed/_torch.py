"""``fastclip.torch``'s entry points for gradients that include DTensors."""

from __future__ import annotations

import math
from typing import Any

import torch

from fastclip import _dispatch
from fastclip._errors import NonFiniteNormError, torch_nonfinite_message

from ._norms import finish_clip_, global_norm, local_nonfinite
from ._reduce import OP_CLIP, dtensor_class, reduce_norms, result_array

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def torch_norm_dtype(tensors: list[Any]) -> torch.dtype | None:
    """The dtype of torch's total norm: the promoted dtype of the gradients (real for
    complex ones); None when some array is not a torch tensor (fastclip's dtype then)."""
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    dtypes = {t.dtype for t in tensors}
    dtype = dtypes.pop()
    for other in dtypes:
        dtype = torch.promote_types(dtype, other)
    return _REAL.get(dtype, dtype)


def _in_torch_dtype(total: Any, tensors: list[Any]) -> Any:
    dtype = torch_norm_dtype(tensors)
    return total if dtype is None else total.to(dtype)


__all__ = ["clip_grad_norm_", "get_total_norm"]


def _as_dtensor_like(total: torch.Tensor, tensors: list[Any]) -> Any:
    """A Replicate DTensor on the mesh of the DTensors, as torch returns; else ``total``."""
    dtensor = dtensor_class()
    meshes = {id(t.device_mesh): t.device_mesh for t in tensors if isinstance(t, dtensor)}
    if len(meshes) != 1:
        return total
    from torch.distributed.tensor import Replicate

    mesh = next(iter(meshes.values()))
    return dtensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


@_dispatch.public("fastclip.distributed.get_total_norm")
def get_total_norm(
    tensors: list[Any], norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> Any:
    """``fastclip.torch.get_total_norm`` for gradients that include DTensors.

    Returns a Replicate DTensor holding the full norm (as torch does: call
    ``.full_tensor()`` for a plain tensor) when the DTensors share one mesh, in
    torch's dtype (the gradients' promoted dtype: float16 for float16 gradients);
    ``error_if_nonfinite`` judges the norm in that dtype, as torch does.
    """

    # torch's dtype, checked there: a finite norm beyond float16's range is inf in it
    total = _in_torch_dtype(global_norm(tensors, norm_type), tensors)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        dtensor = dtensor_class()
        local = [
            t.to_local() if dtensor is not None and isinstance(t, dtensor) else t for t in tensors
        ]
        indices = local_nonfinite(local, norm_type)
        raise NonFiniteNormError(torch_nonfinite_message(norm_type, indices), indices)
    return _as_dtensor_like(total, tensors)


@_dispatch.public("fastclip.distributed.clip_grad_norm_", "grads")
def clip_grad_norm_(
    grads: list[Any], max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> Any:
    """``fastclip.torch.clip_grad_norm_`` for gradients that include DTensors.

    ``grads`` are the non-None gradients.  The norm is reduced over the
    DTensors' mesh (see :func:`clip_by_global_norm_`); returns it as a
    Replicate DTensor on that mesh, in torch's dtype, like
    ``torch.nn.utils.clip_grad_norm_``.  The clip uses the float64 norm; with
    ``error_if_nonfinite`` a norm that is not finite in torch's dtype (float16
    gradients of norm 1e5) raises on every rank before anything is written.
    """

    red = reduce_norms(grads, norm_type, None, (), OP_CLIP, max_norm, 1e-6, True, None, None)
    total = _in_torch_dtype(result_array(red.total, red.loc, red.loc.arrays), grads)
    # The norm in torch's dtype decides, on every rank alike (the same reduced value):
    # float16 gradients of norm 1e5 raise, as torch's do, with nothing written.
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        indices = local_nonfinite(red.loc.arrays, math.inf if red.ord_code == 0 else red.p)
        message = torch_nonfinite_message(norm_type, indices)
        if not indices and bool(torch.isfinite(red.total)):
            message += f" (the norm is finite, but beyond {str(total.dtype)[6:]}'s range)"
        raise NonFiniteNormError(message, indices)
    finish_clip_(red, max_norm, 1e-6, False)
    return _as_dtensor_like(total, grads)
