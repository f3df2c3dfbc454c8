"""Drop-in replacements for ``torch.nn.utils`` gradient clipping, on fastclip kernels.

Same signatures, defaults and return values as ``torch.nn.utils``:

>>> import torch, fastclip.torch as fct
>>> model = torch.nn.Linear(3, 2)
>>> model(torch.ones(4, 3)).sum().backward()
>>> total = fct.clip_grad_norm_(model.parameters(), max_norm=1.0)
>>> bool(fct.get_total_norm([p.grad for p in model.parameters()]) <= 1.0 + 1e-5)
True

Differences from torch, all deliberate and documented:

* norms are accumulated accurately (float32 blocks combined in float64, and
  in float32 for 16-bit gradients, where torch accumulates in the gradient's
  own dtype); the returned norm has torch's dtype (the promoted dtype of the
  gradients);
* ``foreach`` is accepted for compatibility and ignored on the CPU: fastclip
  always uses its multi-tensor kernel (one launch per dtype);
* bad arguments raise before any gradient is written: ``max_norm`` < 0 or
  NaN, ``norm_type`` NaN and ``clip_value`` < 0 are a ValueError (torch
  computes with them: flipped signs or NaN gradients), as is an expanded
  gradient (stride 0, whose elements share memory; torch raises a
  RuntimeError from its in-place multiply);
* ``clip_grad_value_`` validates every gradient before clamping any, so a
  refused list (an expanded or complex gradient anywhere) is left unchanged;
  complex gradients are a TypeError (torch raises NotImplementedError:
  complex numbers have no order);
* lazily negated or conjugated gradients (``._neg_view()``, ``.conj()``)
  are a TypeError naming ``.resolve_neg()`` / ``.resolve_conj()``: fastclip's
  kernels work on memory, where the flag is not applied;
* a Python int beyond float64's range (``10**400``) as ``max_norm``,
  ``norm_type`` or ``clip_value`` is a ValueError (torch raises OverflowError);
* ``norm_type`` <= 0 (0 counts non-zeros, negative p, ``-inf`` the smallest
  ``|x|``: not norms, and fastclip's kernels refuse them) is computed with
  ``torch.linalg.vector_norm`` exactly as ``torch.nn.utils`` computes it (per
  tensor, then over the per-tensor values); the scaling still runs on
  fastclip's kernel;
* ``clip_grad_norm_`` and ``get_total_norm`` also accept an ``nn.Module`` (its
  parameters' gradients), and a non-finite norm with ``error_if_nonfinite=True``
  raises :class:`fastclip.NonFiniteNormError` (torch's message, then which
  gradients are not finite: ``.indices`` among the gradients that are not None,
  and ``.names`` when a Module was given), before any gradient is written;
* :class:`BackwardNorm` takes the global norm while ``backward()`` produces
  the gradients (``register_post_accumulate_grad_hook``), so ``.clip_()``
  after backward makes no norm pass; ``FusedAdamW`` / ``FusedSGD`` do the same
  with ``norm_in_backward=True``;
* :func:`grad_norm` is Lightning's ``grad_norm`` logging dict (per-parameter
  and total gradient norms) from one launch per dtype;
* DTensor gradients (FSDP2, tensor parallel): the norm is reduced over the
  DTensors' mesh by :mod:`fastclip.distributed`; the result is a Replicate
  DTensor, as torch returns;
* :class:`SPAMAdamW` and :class:`StableSPAMAdamW` are the SPAM and
  Stable-SPAM optimizers (spike-aware clipping inside the Adam step), on
  torch's multi-tensor operations;
* :func:`patch` / :func:`unpatch` / :func:`is_patched` route
  ``torch.nn.utils``' own clipping functions to these (Lightning's
  ``gradient_clip_val``, Hugging Face's ``max_grad_norm``, accelerate).

``torch.compile``: the four functions compile with ``fullgraph=True`` and no
graph break, and ``torch.compile(opt.step)`` works for ``FusedAdamW``,
``FusedSGD`` (no break) and ``ClippedOptimizer``.  While Dynamo traces, each
entry point calls a torch custom operator (``torch.ops.fastclip.*``,
registered when this package is imported) that runs the eager code on the
gradients: the same results and errors.  Eager calls skip the operator.  On
CUDA the kernels run on torch's current stream, so the calls can be captured
in a CUDA graph.  See the "torch.compile and CUDA graphs" recipe.
"""

from __future__ import annotations

from ._backward_norm import BackwardNorm
from ._clip_grad import (
    TensorOrTensors as TensorOrTensors,
)
from ._clip_grad import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
)
from ._clipped import ClippedOptimizer
from ._fused import FusedAdamW, FusedSGD
from ._ghost import GhostClipping
from ._ghost_layers import per_sample_grad_norms
from ._grad_norm import grad_norm
from ._patch import is_patched, patch, unpatch
from ._spam import SPAMAdamW
from ._stable_spam import StableSPAMAdamW

__all__ = [  # TensorOrTensors, the parameters' type, is importable but not listed
    "BackwardNorm",
    "ClippedOptimizer",
    "FusedAdamW",
    "FusedSGD",
    "GhostClipping",
    "SPAMAdamW",
    "StableSPAMAdamW",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_norm",
    "is_patched",
    "patch",
    "per_sample_grad_norms",
    "unpatch",
]

for _obj in (GhostClipping, per_sample_grad_norms, SPAMAdamW, StableSPAMAdamW):
    _obj.__module__ = "fastclip.torch"  # the public path (reprs, docs, pickles), as torch does
del _obj
