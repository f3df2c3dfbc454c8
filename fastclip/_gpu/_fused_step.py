"""The fused clip-and-step flows of the GPU route, with the CPU route's names
(``_cpu/_fused_step.py``): ``adamw_step_`` / ``sgd_step_`` for
``fastclip.optim``, and the phases ``step_plan`` / ``step_prepare`` /
``step_run`` for the ``fastclip.torch`` fused optimizers.  Every launch runs
on the arrays' device and the caller's stream.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._typing import StepClip
from . import _adapters, _optim, _optim_plan


def adamw_step_(
    lib: Any,
    ps: list[Any],
    gs: list[Any],
    ms: list[Any],
    vs: list[Any],
    xs: list[Any] | None,
    hparams: np.ndarray,
    maximize: bool,
    clip: StepClip,
) -> Any:
    """One fused AdamW step on the device; the 0-d device norm (None without ``max_norm``)."""
    return _optim.adamw_step_gpu(lib, ps, gs, ms, vs, xs, hparams, maximize, *_clip_args(clip))


def sgd_step_(
    lib: Any,
    ps: list[Any],
    gs: list[Any],
    bufs: list[Any] | None,
    hparams: np.ndarray,
    maximize: bool,
    clip: StepClip,
) -> Any:
    """One fused SGD step on the device; the 0-d device norm (None without ``max_norm``)."""
    return _optim.sgd_step_gpu(lib, ps, gs, bufs, hparams, maximize, *_clip_args(clip))


def _clip_args(clip: StepClip) -> tuple[Any, ...]:
    """The GPU drivers' order: max_norm, norm_type, total_norm, clip_coef, eps, policy."""
    return clip.max_norm, clip.norm_type, clip.total_norm, clip.clip_coef, clip.eps, clip.nonfinite


def step_plan(lib: Any, grads: list[Any], clip: StepClip, what: str) -> Any:
    """The device norm and coefficient of one step (a ``GpuClip``).

    No host sync, except ``nonfinite="error"`` and ``"skip"``: both read the
    norm back once, "skip" because the step counts (AdamW) and first-step
    momentum buffers (SGD) are decided on the host.
    """
    skip = clip.nonfinite == "skip"
    policy = "propagate" if skip else clip.nonfinite
    with _adapters.on_device(lib, grads[0]):
        plan = _optim_plan.clip_plan(
            lib, grads, clip.max_norm, clip.norm_type, None, None, clip.eps, policy, what
        )
        if skip and plan.norm is not None:
            plan.skip = not math.isfinite(lib.host_float(plan.norm))  # the documented sync
    return plan


def step_prepare(lib: Any, lists: list[Any], amsgrad: bool | None, what: str) -> Any:
    """Validate and pack one launch: AdamW (``amsgrad`` a bool) or SGD (None)."""
    written = [True, False, True] if amsgrad is None else [True, False, True, True, True]
    with _adapters.on_device(lib, lists[0][0]):
        return _optim.Step(lib, lists, written, what)


def step_run(
    lib: Any,
    prepared: Any,
    lists: list[Any],
    hparams: np.ndarray,
    plan: Any,
    sign: float,
    amsgrad: bool | None,
) -> None:
    """Launch a prepared step (one fused launch per dtype)."""
    with _adapters.on_device(lib, lists[0][0]):
        if amsgrad is None:
            prepared.launch_sgd(hparams, plan, sign)
        else:
            prepared.launch_adamw(hparams, plan, sign, bool(amsgrad))
        lib.touched(lists[0])
