"""The fused optimizers' shared clip logic: one global norm over every group, then the launches.

:class:`FusedOptimizerBase` holds what ``FusedAdamW`` and ``FusedSGD`` share:
the clip settings, the gradients of every group, the clip plan (norm and
coefficient, computed after every group was validated and before anything is
written) and the prepare-then-run launches on the CPU and GPU routes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from fastclip._validate import check_max_norm, check_nonfinite, check_ord
from fastclip.optim import _functional as F  # layer: its internals, marked where used

__all__ = ["FusedOptimizerBase"]


class FusedOptimizerBase(Optimizer):
    """Shared clip logic of the fused optimizers."""

    max_norm: float | None
    norm_type: float
    nonfinite: str
    last_total_norm: torch.Tensor | None
    last_step_skipped: bool

    def _setup_clip(self, max_norm: float | None, norm_type: float, nonfinite: str) -> None:
        if max_norm is not None:
            check_max_norm(max_norm)
        check_ord(norm_type)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.norm_type = float(norm_type)
        self.nonfinite = check_nonfinite(nonfinite)
        self.last_total_norm = None
        self.last_step_skipped = False

    def _all_grads(self) -> list[torch.Tensor]:
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    if g.is_sparse:
                        raise RuntimeError(
                            f"{type(self).__name__} does not support sparse gradients"
                        )
                    grads.append(g)
        return grads

    def _clip(self, grads: list[torch.Tensor], gpu: bool) -> Any:
        """Norm and coefficient over every gradient of every group: an ``F.Clip``
        (CPU) or a ``_gpu._optim.GpuClip``.  Sets ``last_total_norm`` and
        ``last_step_skipped`` only once the plan stands (an error leaves them)."""
        if gpu:
            return self._clip_gpu(grads)
        # layer: the lead routes F.cpu_lib and F.clip_plan through _dispatch
        lib = F.cpu_lib(grads, type(self).__name__)
        plan = F.clip_plan(
            lib,
            grads,
            self.max_norm,
            self.norm_type,
            None,
            None,
            1e-6,
            self.nonfinite,
            type(self).__name__,
        )
        # in the norm's dtype (float64 when a gradient is float64), as on the GPU:
        # a float64 norm of 1e200 must not be reported as float32's inf
        self.last_total_norm = (
            None
            if plan.norm is None
            else torch.tensor(
                plan.norm,
                dtype=torch.float64 if plan.norm_dtype == np.float64 else torch.float32,
            )
        )
        self.last_step_skipped = plan.skip
        return plan

    def _begin_step(self, closure: Callable[[], Any] | None) -> tuple[Any, list[torch.Tensor]]:
        """``closure()``'s loss (None without one) and every group's gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._all_grads()
        if not grads:
            self.last_total_norm = None
            self.last_step_skipped = False
        return loss, grads

    def _clip_gpu(self, grads: list[torch.Tensor]) -> Any:
        """The GPU plan: device norm and coefficient (``_gpu._optim.GpuClip``).

        No host sync, except ``nonfinite="error"`` and ``"skip"``: both read the
        norm back once, "skip" because the step counts (AdamW) and first-step
        momentum buffers (SGD) are decided on the host.
        """
        # layer: the lead routes F.gpu_lib, _driver._on_device and G.clip_plan through _dispatch
        from fastclip._gpu import _driver
        from fastclip._gpu import _optim as G

        what = type(self).__name__
        lib = F.gpu_lib([grads], what)
        policy = "propagate" if self.nonfinite == "skip" else self.nonfinite
        with _driver._on_device(lib, grads[0]):
            plan = G.clip_plan(
                lib, grads, self.max_norm, self.norm_type, None, None, 1e-6, policy, what
            )
            if self.nonfinite == "skip" and plan.norm is not None:
                plan.skip = not math.isfinite(lib.host_float(plan.norm))  # the documented sync
        self.last_total_norm = plan.norm
        self.last_step_skipped = plan.skip
        return plan

    def _prepare(self, lists: list[Any], gpu: bool, ams: Any) -> Any:
        """Validate and pack one fused launch before anything is written:
        AdamW (``ams`` a bool) or SGD (``ams`` None).  ``(lib, prepared)``."""
        what = type(self).__name__
        if not gpu:
            # layer: the lead routes F.cpu_lib and F.prepare_* through _dispatch
            lib = F.cpu_lib(lists[0], what)
            if ams is None:
                return lib, F.prepare_sgd(lib, *lists)
            return lib, F.prepare_adamw(lib, *lists)
        # layer: the lead routes F.gpu_lib, _driver._on_device and G.Step through _dispatch
        from fastclip._gpu import _driver
        from fastclip._gpu import _optim as G

        lib = F.gpu_lib(lists, what)
        with _driver._on_device(lib, lists[0][0]):
            if ams is None:
                return lib, G.Step(lib, lists, [True, False, True], what)
            return lib, G.Step(lib, lists, [True, False, True, True, True], what)

    def _run(
        self, prepared: Any, lists: list[Any], hp: np.ndarray, plan: Any, sign: float, ams: Any
    ) -> None:
        """Launch a prepared step (one fused launch per dtype)."""
        lib, work = prepared
        # layer: the lead routes F.Clip, F.run_* and _driver._on_device through _dispatch
        if isinstance(plan, F.Clip):
            if ams is None:
                F.run_sgd(lib, lists[0], work, hp, sign * plan.coef)
            else:
                F.run_adamw(lib, lists[0], work, hp, sign * plan.coef, bool(ams))
            return
        from fastclip._gpu import _driver

        with _driver._on_device(lib, lists[0][0]):
            if ams is None:
                work.launch_sgd(hp, plan, sign)
            else:
                work.launch_adamw(hp, plan, sign, bool(ams))
            lib.touched(lists[0])

    def __repr__(self) -> str:
        head = super().__repr__()
        return head.replace("(", f"(max_norm={self.max_norm}, ", 1) if self.max_norm else head
