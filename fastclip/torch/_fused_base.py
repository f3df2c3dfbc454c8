"""The fused optimizers' shared clip logic: one global norm over every group, then the launches.

:class:`FusedOptimizerBase` holds what ``FusedAdamW`` and ``FusedSGD`` share:
the clip settings, the gradients of every group, the clip plan (norm and
coefficient, computed after every group was validated and before anything is
written) and the prepare-then-run launches, through the backend
``fastclip._dispatch.backend_for_step`` binds (the CPU or the GPU route).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from fastclip import _dispatch
from fastclip._typing import StepClip
from fastclip._validate import check_max_norm, check_nonfinite, check_ord

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

    def _backend(self, lists: list[Any]) -> Any:
        """The CPU or GPU backend of a step's parallel lists (TypeError otherwise)."""
        return _dispatch.backend_for_step(lists, type(self).__name__)

    def _clip(self, grads: list[torch.Tensor], backend: Any = None) -> Any:
        """Norm and coefficient over every gradient of every group (the route's
        plan: host values on the CPU, device values on the GPU).  Sets
        ``last_total_norm`` and ``last_step_skipped`` only once the plan stands
        (an error leaves them)."""
        if backend is None:  # the gradients' backend, unless the step has it already
            backend = self._backend([grads])
        clip = StepClip(self.max_norm, self.norm_type, None, None, 1e-6, self.nonfinite)
        plan = backend.step_plan(grads, clip, type(self).__name__)
        if backend.on_gpu:
            self.last_total_norm = plan.norm
        else:
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

    def _prepare(self, lists: list[Any], ams: Any) -> Any:
        """Validate and pack one fused launch before anything is written:
        AdamW (``ams`` a bool) or SGD (``ams`` None).  ``(backend, prepared)``."""
        backend = self._backend(lists)
        return backend, backend.step_prepare(lists, ams, type(self).__name__)

    def _run(
        self, prepared: Any, lists: list[Any], hparams: np.ndarray, plan: Any, sign: float, ams: Any
    ) -> None:
        """Launch a prepared step (one fused launch per dtype)."""
        backend, work = prepared
        backend.step_run(work, lists, hparams, plan, sign, ams)

    def __repr__(self) -> str:
        head = super().__repr__()
        return head.replace("(", f"(max_norm={self.max_norm}, ", 1) if self.max_norm else head
