"""The implementations ``fastclip bench`` times, one module per library; each
``make_*`` turns a :class:`~fastclip._bench.data.CaseData` into an ``Op``.

* ``_fastclip``  fastclip on NumPy, torch CPU, and CUDA tensors or CuPy arrays;
* ``_numpy``     the textbook NumPy recipe, and the same on CuPy;
* ``_torch``     ``torch.nn.utils`` (foreach / loop), ``torch.optim.AdamW``, the Opacus formula;
* ``_optax``     optax under ``jax.jit``;
* ``_opacus``    Opacus' ``DPOptimizer.clip_and_accumulate``;
* ``_common``    the ``Op`` type, the probes, the ``adamw`` check's reader.

The modules are named after the library with a leading underscore so that no
module shares a name with the library it imports (``import torch`` inside
``_torch.py`` reads as what it is).  :mod:`fastclip._bench.registry` names the
backends built from them.
"""

from __future__ import annotations

from ._common import (
    Op,
    gpu_storage,
    probe_cupy,
    probe_fastclip_gpu,
    probe_opacus,
    probe_optax,
    probe_torch,
    probe_torch_cuda,
)
from ._fastclip import make_fastclip, make_fastclip_gpu, make_fastclip_torch
from ._numpy import make_cupy, make_numpy
from ._opacus import make_opacus
from ._optax import make_optax
from ._torch import torch_backend

__all__ = [
    "Op",
    "gpu_storage",
    "make_cupy",
    "make_fastclip",
    "make_fastclip_gpu",
    "make_fastclip_torch",
    "make_numpy",
    "make_opacus",
    "make_optax",
    "probe_cupy",
    "probe_fastclip_gpu",
    "probe_opacus",
    "probe_optax",
    "probe_torch",
    "probe_torch_cuda",
    "torch_backend",
]
