"""``fastclip.torch``'s entry points for gradients that include DTensors."""

from __future__ import annotations

from typing import Any

import torch

from fastclip import _dispatch
from fastclip._errors import NonFiniteNormError, torch_nonfinite_message

from ._norms import clip_by_global_norm_, global_norm, local_nonfinite
from ._reduce import dtensor_class

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
    ``.full_tensor()`` for a plain tensor) when the DTensors share one mesh.
    """

    total = global_norm(tensors, norm_type)
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
    Replicate DTensor on that mesh, like ``torch.nn.utils.clip_grad_norm_``.
    """

    try:
        total = clip_by_global_norm_(
            grads, max_norm, norm_type, eps=1e-6, error_if_nonfinite=error_if_nonfinite
        )
    except NonFiniteNormError as err:  # torch's message, this rank's culprits kept
        raise NonFiniteNormError(
            torch_nonfinite_message(norm_type, err.indices), err.indices
        ) from None
    return _as_dtensor_like(total, grads)
