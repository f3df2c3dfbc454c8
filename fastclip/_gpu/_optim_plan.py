"""The clip part of a fused GPU step (AdamW, SGD): the device clip plan.

The clip coefficient comes from the core's global-norm path
(``_tables.Packed.finish``: ``fastclip_partial_pow_sum`` + ``fastclip_finish``),
which leaves the norm and ``min(1, max_norm / (norm + eps))`` in device
memory; with a given device ``total_norm`` only the finish kernel runs.  The
norm and the coefficient stay on the device; the fused kernels read them there.

Host synchronisations: none, except ``nonfinite="error"`` (reads the norm, or a
device ``clip_coef``, to raise before any write: one sync, as the CPU path
needs the norm on the host).  ``nonfinite="skip"`` is decided by the kernel
itself (a guard mode): it reads the device norm first and returns without
writing anything when it is NaN/inf (so the caller cannot know without reading
the returned norm).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _config as cfg
from .._errors import NonFiniteNormError, nonfinite_step_message
from .._formulas import clip_coefficient
from .._validate import clip_mode, norm_args
from . import _modules
from ._modules import ELEMENT_TYPES
from ._tables import Packed, u64

__all__ = ["GUARD_COEF", "GUARD_NONE", "GUARD_NORM_F32", "GUARD_NORM_F64", "GpuClip", "clip_plan"]

#: Guard modes of the kernels (see optim_kernels.cu).
GUARD_NONE, GUARD_NORM_F32, GUARD_NORM_F64, GUARD_COEF = 0, 1, 2, 3


class GpuClip:
    """The clip part of a fused GPU step.

    The kernel multiplies gradients by ``coef_host * coef_dev[0]`` (``coef_dev``
    a float64 device scalar, or None for 1) and, with a guard, returns before
    writing anything when the guard says so.  ``norm`` is the 0-d device norm
    returned to the caller; ``skip`` a decision already known on the host.
    """

    __slots__ = ("coef_dev", "coef_host", "guard", "guard_mode", "norm", "skip")

    def __init__(self) -> None:
        self.coef_dev: Any = None
        self.coef_host = 1.0
        self.guard: Any = None
        self.guard_mode = GUARD_NONE
        self.norm: Any = None
        self.skip = False


def _full(lib: Any, value: float, kind: str, like: Any) -> Any:
    """A 0-d array of ``kind`` holding ``value`` on ``like``'s device (no sync)."""
    if lib.name == "torch":
        import torch

        return torch.full((), value, dtype=getattr(torch, kind), device=like.device)
    if lib.name == "cupy":
        import cupy

        return cupy.full((), value, dtype=np.dtype(kind))
    out = lib.empty((), kind, like)  # other adapters (the CPU emulation in tests)
    out[...] = value
    return out


def _finish_given(
    lib: Any, given: Any, max_norm: float, eps: float, kind: str, like: Any
) -> tuple[Any, Any]:
    """``fastclip_finish`` on a given device norm (no partial sums): (norm, coefficient)."""
    norm = lib.empty((), kind, like)
    coef = lib.empty((), "float64", like)
    k = _modules.kernel("core", lib.device_id(like), "fastclip_finish", ELEMENT_TYPES[kind])
    args = (
        u64(0),
        np.int64(0),
        np.int32(2),
        np.float64(2.0),
        np.float64(max_norm),
        np.float64(eps),
        np.int32(1),
        u64(lib.ptr(given)),
        u64(lib.ptr(norm)),
        u64(lib.ptr(coef)),
    )
    k((1,), (cfg.GPU_FINISH_BLOCK,), args)
    return norm, coef


def _check_device(lib: Any, value: Any, like: Any, name: str) -> None:
    if lib.device_id(value) != lib.device_id(like):
        raise TypeError(
            f"{name} is on device {lib.device_id(value)}, the arrays on {lib.device_id(like)}"
        )


def clip_plan(
    lib: Any,
    grads: list[Any],
    max_norm: float | None,
    norm_type: Any,
    total_norm: Any,
    clip_coef: Any,
    eps: Any,
    nonfinite: str,
    what: str,
) -> GpuClip:
    """The GPU twin of the CPU route's ``clip_plan``; nothing is written to the lists.

    ``total_norm`` and ``clip_coef`` are None, a Python float (known on the
    host: decided there, no sync) or a 0-d device array of ``lib`` (used on the
    device).  Raises :class:`fastclip.NonFiniteNormError` for ``"error"``
    (one host sync); ``"skip"`` sets the kernel's guard.
    """
    like = grads[0]
    plan = GpuClip()
    mode = clip_mode(max_norm, total_norm, clip_coef, what)
    if mode == "coef":
        if isinstance(clip_coef, float):
            plan.coef_host = clip_coef
            if not clip_coef >= 0.0:
                if nonfinite == "error":
                    raise NonFiniteNormError(f"{what}: the clip coefficient is {clip_coef}")
                plan.skip = nonfinite == "skip"
            return plan
        _check_device(lib, clip_coef, like, "clip_coef")
        plan.coef_dev = lib.to_f64(clip_coef)
        if nonfinite == "error":
            value = lib.host_float(plan.coef_dev)  # the documented synchronisation
            if not value >= 0.0:
                raise NonFiniteNormError(f"{what}: the clip coefficient is {value}")
        elif nonfinite == "skip":
            plan.guard_mode, plan.guard = GUARD_COEF, plan.coef_dev
        return plan
    if mode == "none":
        return plan
    c, ord_code, p, eps_v = norm_args(max_norm, norm_type, eps)
    kind = "float64" if any(lib.kind(g) == "float64" for g in grads) else "float32"
    if isinstance(total_norm, float):  # known on the host: decided there, as the CPU path
        plan.norm = _full(lib, total_norm, kind, like)
        if not math.isfinite(total_norm):
            if nonfinite == "error":
                raise NonFiniteNormError(nonfinite_step_message(what, total_norm))
            if nonfinite == "skip":
                plan.skip = True
                return plan
        plan.coef_host = clip_coefficient(c, total_norm, eps_v)
        return plan
    if total_norm is None:
        packed = Packed(lib, grads, what, writing=False)
        kind = packed.norm_kind
        norm, coef = packed.finish(ord_code, p, c, eps_v, 1)
    else:
        _check_device(lib, total_norm, like, "total_norm")
        norm, coef = _finish_given(lib, lib.to_f64(total_norm), c, eps_v, kind, like)
    plan.norm, plan.coef_dev = norm, coef
    if nonfinite == "error":
        value = lib.host_float(norm)  # the documented synchronisation
        if not math.isfinite(value):
            raise NonFiniteNormError(nonfinite_step_message(what, value))
    elif nonfinite == "skip":
        plan.guard = norm
        plan.guard_mode = GUARD_NORM_F64 if kind == "float64" else GUARD_NORM_F32
    return plan
