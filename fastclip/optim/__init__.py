"""Fused clip-and-step optimizers: the clip coefficient applied inside the update.

Framework-agnostic functions on lists of arrays (NumPy arrays, torch CPU
tensors), one Numba multi-tensor kernel launch per dtype:

* :func:`sgd_step_`: ``torch.optim.SGD`` (momentum, dampening, Nesterov,
  weight decay, maximize);
* :func:`adamw_step_`: ``torch.optim.AdamW`` (bias correction, AMSGrad).

With ``max_norm`` the global gradient norm is computed by the core's
multi-tensor norm kernel (one read of the gradients) and the coefficient
``min(1, max_norm / (norm + 1e-6))`` multiplies each gradient element inside
the update (a second read); the gradients are never written.  Clipping then
costs one read pass instead of the three of ``clip_grad_norm_`` + step
(norm read, scale read + write).

The torch ``Optimizer`` drop-ins are ``fastclip.torch.FusedAdamW`` and
``fastclip.torch.FusedSGD``.  CUDA tensors and CuPy arrays take fused CUDA
kernels (``fastclip/_gpu/optim_kernels.cu``: one launch per dtype, the clip
coefficient read from device memory, no host synchronisation except
``nonfinite="error"``); they compile in CI but have not yet run on a GPU.
"""

from ._functional import adamw_step_, sgd_step_

__all__ = ["adamw_step_", "sgd_step_"]

# Docs, reprs and pickles show the public path (as torch sets
# ``clip_grad_norm_.__module__ = "torch.nn.utils"``).
adamw_step_.__module__ = sgd_step_.__module__ = "fastclip.optim"
