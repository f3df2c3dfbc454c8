"""The GPU route: CUDA kernels (``kernels.cu``, ``wide_kernels.cu``, ``optim_kernels.cu``,
``per_sample_kernels.cu``, ``spam_kernels.cu``) launched through CuPy on CuPy arrays and torch CUDA
tensors.

Zero-copy: kernels receive the arrays' raw device pointers.  Every launch runs
on the caller's stream (torch's current stream for CUDA tensors, CuPy's
current stream for CuPy arrays), scratch memory comes from the same library's
stream-ordered allocator, and norms and clip coefficients stay in device
memory: the host never waits, except where a result must be read
(``error_if_nonfinite=True``, ``nonfinite="error"``, the per-sample
``n_clipped``).

The ops have the CPU route's names and signatures (``_typing.RouteOps``), the
adapter first (``lib_for(library name)``).  Importing this package imports no CuPy: each
kernel module is built on first use per device (``_modules.module``).

Inside the package imports run one way: ``_core`` / ``_optim`` /
``_per_sample`` / ``_wide`` -> ``_axes`` / ``_optim_plan`` -> ``_tables`` ->
``_modules``, with ``_adapters`` beside them.  ``norm64`` (``_wide``) is the
float64-accumulating norm ``fastclip.distributed`` reduces across ranks.
"""

from __future__ import annotations

from ._adapters import lib_for, on_device
from ._core import clip_by_value, clip_global, global_norm, norm, rescale, scale_
from ._fused_step import adamw_step_, sgd_step_, step_plan, step_prepare, step_run
from ._optim import Step, adamw_step_gpu, sgd_step_gpu
from ._optim_plan import GpuClip, clip_plan
from ._per_sample import clip_per_sample_gpu
from ._per_sample import clip_per_sample_gpu as clip_per_sample
from ._spam import spam_prepare, spam_reduce, spam_run
from ._tables import Packed
from ._targets import check_targets
from ._value_clip import clamp_many_
from ._wide import norm64

__all__ = [
    "GpuClip",
    "Packed",
    "Step",
    "adamw_step_",
    "adamw_step_gpu",
    "check_targets",
    "clamp_many_",
    "clip_by_value",
    "clip_global",
    "clip_per_sample",
    "clip_per_sample_gpu",
    "clip_plan",
    "global_norm",
    "lib_for",
    "norm",
    "norm64",
    "on_device",
    "rescale",
    "scale_",
    "sgd_step_",
    "sgd_step_gpu",
    "spam_prepare",
    "spam_reduce",
    "spam_run",
    "step_plan",
    "step_prepare",
    "step_run",
]
