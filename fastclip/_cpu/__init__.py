"""The CPU route: NumPy arrays and torch CPU tensors, clipped by Numba kernels.

Imported only lazily by the dispatcher (``import fastclip`` imports no numba).
Layout rules (documented in README, "Routes"):

* C-contiguous data is used in place, zero-copy.
* Non-contiguous data is *copied in* to a contiguous buffer for the kernel; an
  in-place call then *copies out* into the caller's memory, so in-place stays in
  place.  Reductions over leading or trailing axes of contiguous data need no copy.
* Lists of arrays become one table of (address, size) per storage dtype, so N
  arrays cost one kernel launch per dtype, not N.

The modules, top to bottom (an import only points down; ``_adapters`` is the leaf):

* ``_core`` (the route ops), ``_value_clip`` (many-array value clipping),
  ``_per_sample``, ``_fused_step`` (the fused clip-and-step flows), ``_spam`` (the fused
  SPAM / Stable-SPAM steps), ``_targets``
  (checks and float64 norms for ``fastclip.distributed``), ``_fast`` (the
  one-small-array fast paths), ``_optim`` (fused-step groups);
* ``_pack`` (tables of lists), ``_axes`` (per-slice plans), ``_headers`` (the bulk
  NumPy header read);
* ``_launch`` (serial / parallel launches, threading layer, fork);
* ``_build`` (lazy, disk-cached numba twins: ``jit_pair``, ``kernel``);
* ``_kernels``, ``_header_kernels``, ``_optim_kernels``, ``_spam_kernels``,
  ``_per_sample_kernels``, ``_wide_kernels`` (float64-accumulated power sums);
* ``_elements``, ``_intrinsics``;
* ``_adapters`` (``NumpyLib``, ``TorchLib``: storage views, wrapping, ``touched``).

Every op takes the adapter (``lib``) first.
"""

from __future__ import annotations

from typing import Any

from . import _build
from ._adapters import NumpyLib, TorchLib, float_storage, lib_for, norm_dtype, refuse_dtype
from ._axes import AxisPlan
from ._build import jit_pair, kernel
from ._core import (
    clip_by_value,
    clip_global,
    global_norm,
    norm,
    rescale,
    scale_,
)
from ._fused_step import adamw_step_, sgd_step_, step_plan, step_prepare, step_run
from ._launch import policy, run, run_with, threading_layer
from ._optim import global_norm_and_dtype, groups
from ._pack import pack
from ._per_sample import clip_per_sample
from ._spam import spam_prepare, spam_reduce, spam_run
from ._targets import check_targets, norm64
from ._value_clip import clamp_many, clamp_many_

__all__ = [
    "AxisPlan",
    "NumpyLib",
    "TorchLib",
    "adamw_step_",
    "check_targets",
    "clamp_many",
    "clamp_many_",
    "clip_by_value",
    "clip_global",
    "clip_per_sample",
    "float_storage",
    "global_norm",
    "global_norm_and_dtype",
    "groups",
    "jit_pair",
    "kernel",
    "lib_for",
    "norm",
    "norm64",
    "norm_dtype",
    "pack",
    "policy",
    "refuse_dtype",
    "rescale",
    "run",
    "run_with",
    "scale_",
    "sgd_step_",
    "spam_prepare",
    "spam_reduce",
    "spam_run",
    "status",
    "step_plan",
    "step_prepare",
    "step_run",
    "threading_layer",
]


def status() -> dict[str, Any]:
    """The route's state for ``fastclip.info()``.

    ``threading_layer``: numba's layer once a parallel kernel ran, else None;
    ``threads``: the serial/parallel policy in force, in words (``_launch.policy``);
    ``cache_dir``: the folder the kernels are cached in, once the first kernel
    was built; ``cache_disabled_reason``: why on-disk caching is off, or None;
    ``cache``: the folder in use and why there, in words (``_build.cache_origin``).
    """
    cache = _build.cache_origin()
    return {
        "cache": cache,
        "threading_layer": threading_layer(),
        "threads": policy(),
        "cache_dir": _build.cache_dir,
        "cache_disabled_reason": _build.cache_disabled_reason,
    }
