"""The fused optimizers' shared clip logic: one global norm over every group, then the launches.

:class:`FusedOptimizerBase` holds what ``FusedAdamW`` and ``FusedSGD`` share:
the clip settings, the gradients of every group, the clip plan (norm and
coefficient, computed after every group was validated and before anything is
written) and the prepare-then-run launches, through the backend
``fastclip._dispatch.backend_for_step`` binds (the CPU or the GPU route).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch.optim import Optimizer

from fastclip import _dispatch
from fastclip._errors import public_method
from fastclip._typing import StepClip
from fastclip._validate import check_max_norm, check_nonfinite, check_ord
from fastclip.distributed import has_dtensor, local_tensors
from fastclip.distributed._adaptive import Plan

from . import _ops
from ._backward_norm import BackwardNorm

__all__ = ["FusedOptimizerBase"]


def _locals(lists: list[Any]) -> list[Any]:
    """The step's parallel lists with every DTensor replaced by its local shard (a view:
    the fused kernels write the DTensors' memory)."""
    return [None if lst is None else local_tensors(lst) for lst in lists]


class FusedOptimizerBase(Optimizer):
    """Shared clip logic of the fused optimizers."""

    max_norm: float | None
    norm_type: float
    nonfinite: str
    last_total_norm: torch.Tensor | None
    last_step_skipped: bool
    backward_norm: BackwardNorm | None  # with norm_in_backward=True: the hooks' norms
    STATE_KEYS: ClassVar[tuple[str, ...]]  # a parameter's state tensors, in this order

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The constructor and the step (its eager body, ``_update``, which the
        # compiled step's operator runs too) name the optimizer in their
        # TypeErrors and ValueErrors: "fastclip.torch.FusedAdamW: Invalid learning
        # rate: -1.0", "fastclip.torch.FusedSGD.step: ...".  ``step`` itself is
        # not wrapped: the user's closure runs there, and its errors are its own
        # (as are those of a user's subclass).
        super().__init_subclass__(**kwargs)
        for attr, method in (("__init__", "__init__"), ("_update", "step")):
            function = cls.__dict__.get(attr)
            if function is not None and cls.__module__.startswith("fastclip."):
                setattr(
                    cls, attr, public_method(method, tracing=torch.compiler.is_compiling)(function)
                )

    def _setup_clip(
        self,
        max_norm: float | None,
        norm_type: float,
        nonfinite: str,
        norm_in_backward: bool,
        norm_plan: Any = None,
    ) -> None:
        if max_norm is not None:
            check_max_norm(max_norm)
        check_ord(norm_type, "norm_type")
        if norm_in_backward and max_norm is None:
            raise ValueError(
                "norm_in_backward=True needs max_norm (the norm taken "
                "during backward is the global norm the step clips to max_norm)"
            )
        if norm_plan is not None and (norm_in_backward or not isinstance(norm_plan, Plan)):
            raise (ValueError if norm_in_backward else TypeError)(
                f"{type(self).__name__}: norm_plan takes a fastclip.distributed.Plan and "
                "does not combine with norm_in_backward"
            )
        self._norm_plan = norm_plan
        self._dist_error: BaseException | None = None
        self.max_norm = None if max_norm is None else float(max_norm)
        self.norm_type = float(norm_type)
        self.nonfinite = check_nonfinite(nonfinite)
        self.last_total_norm = None
        self.last_step_skipped = False
        self._handle = _ops.register(self)
        self._set_backward_norm(bool(norm_in_backward))

    def _set_backward_norm(self, on: bool) -> None:
        """Register (``on``) the hooks of ``norm_in_backward`` on every group's parameters."""
        self.backward_norm = None
        if on:
            params = [p for group in self.param_groups for p in group["params"]]
            self.backward_norm = BackwardNorm(params, self.norm_type)

    @property
    def norm_in_backward(self) -> bool:
        """Whether the global norm is taken during backward (by ``backward_norm``'s hooks)."""
        return getattr(self, "backward_norm", None) is not None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        bn = getattr(self, "backward_norm", None)
        if bn is not None:  # the hooks follow the groups (torch's __init__ adds them first)
            bn.add(self.param_groups[-1]["params"])

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer.__getstate__ keeps defaults, state and param_groups
        # only: a deep copy or a pickle would otherwise lose the clip settings.
        state = dict(super().__getstate__())
        state["_fastclip_clip"] = (
            self.max_norm,
            self.norm_type,
            self.nonfinite,
            self.norm_in_backward,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also called by torch's load_state_dict (state and param_groups only):
        # the clip settings are then the optimizer's own and stay.
        state = dict(state)
        clip = state.pop("_fastclip_clip", None)
        super().__setstate__(state)
        if clip is None and not hasattr(self, "max_norm"):
            clip = (None, 2.0, "propagate")  # pickled before the settings travelled
        if clip is not None:
            self.max_norm, self.norm_type, self.nonfinite = clip[:3]
            self.last_total_norm = None
            self.last_step_skipped = False
            # a copy's parameters are new tensors: its hooks are its own
            self._set_backward_norm(len(clip) > 3 and bool(clip[3]))
        self._handle = _ops.register(self)  # a copy or an unpickled optimizer: its own

    def _update(self, grads: list[torch.Tensor]) -> None:
        """The eager step after ``closure()``, on a non-empty list of gradients."""
        raise NotImplementedError

    def _traced_step(self, closure: Callable[[], Any] | None) -> Any:
        """``step()`` while Dynamo traces it (``torch.compile(opt.step)``).

        The parameters' gradients and state are gathered in traced Python and
        handed to one ``fastclip::fused_step_`` operator, which runs the eager
        step on them: same validation, results and errors.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        states: list[torch.Tensor] = []
        group_sizes: list[int] = []
        layout: list[int] = []
        for group in self.param_groups:
            n = 0
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state.get(p)
                tensors = [state[k] for k in self.STATE_KEYS if k in state] if state else []
                params.append(p)
                grads.append(g)
                states += tensors
                layout.append(len(tensors))
                n += 1
            group_sizes.append(n)
        if not grads:
            self.last_total_norm = None
            self.last_step_skipped = False
            return loss
        _ops.fused_step(self._handle, params, grads, states, group_sizes, layout)
        return loss

    def _step_on(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[torch.Tensor],
        group_sizes: list[int],
        layout: list[int],
    ) -> None:
        """The eager step on the tensors ``fastclip::fused_step_`` was given.

        A shallow twin of this optimizer holds them (its groups' settings are
        this optimizer's, read now); new state and the clip report are then
        stored here, keyed by this optimizer's own parameters.
        """
        own = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if len(own) != len(params) or len(group_sizes) != len(self.param_groups):
            raise RuntimeError(
                f"{type(self).__name__}: the compiled step's parameters no longer match "
                "param_groups; call torch._dynamo.reset() after changing them"
            )
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.param_groups = []
        twin.state = defaultdict(dict)
        at = k = 0
        for group, size in zip(self.param_groups, group_sizes):
            twin.param_groups.append({**group, "params": params[at : at + size]})
            at += size
        for p, g, count, mine in zip(params, grads, layout, own):
            if p is not mine:  # a copy the compiler's backend made: the eager code reads .grad
                p.grad = g
            if count:  # the keys present are a prefix of STATE_KEYS (optional ones last)
                twin.state[p] = dict(zip(self.STATE_KEYS, states[k : k + count]))
                k += count
        twin._update(grads)
        self.last_total_norm = twin.last_total_norm
        self.last_step_skipped = twin.last_step_skipped
        for p, mine, count in zip(params, own, layout):
            new = twin.state.get(p)
            if new and not count:  # created by this step (existing state was written in place)
                self.state[mine].update(new)

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
        return _dispatch.backend_for_step(_locals(lists), type(self).__name__)

    def _distributed(self, grads: list[torch.Tensor]) -> bool:
        """Whether the step's norm is reduced over ranks (a plan, or DTensor gradients)."""
        return getattr(self, "_norm_plan", None) is not None or has_dtensor(grads)

    def _clip(self, grads: list[torch.Tensor], backend: Any = None) -> Any:
        """Norm and coefficient over every gradient of every group (the route's
        plan: host values on the CPU, device values on the GPU).  Sets
        ``last_total_norm`` and ``last_step_skipped`` only once the plan stands
        (an error leaves them)."""
        if backend is None:  # the gradients' backend, unless the step has it already
            backend = self._backend([grads])
        clip, unscaled = self._step_clip()
        if self.max_norm is not None and self.backward_norm is None and self._distributed(grads):
            total = self._global_norm(grads)
            given = total if backend.on_gpu else float(total)
            clip = StepClip(self.max_norm, self.norm_type, given, None, 1e-6, self.nonfinite)
        elif self._dist_error is not None:
            error, self._dist_error = self._dist_error, None
            raise error
        grads = local_tensors(grads)
        plan = backend.step_plan(grads, clip, type(self).__name__)
        if unscaled is not None:  # the norm of the unscaled gradients, reported
            wide = any(g.dtype == torch.float64 for g in grads)
            if isinstance(unscaled, float):
                plan.norm = unscaled
                plan.norm_dtype = np.dtype(np.float64 if wide else np.float32)
            else:
                plan.norm = unscaled.to(torch.float64 if wide else torch.float32)
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

    def _step_clip(self) -> tuple[StepClip, Any]:
        """The step's clip arguments, and the unscaled norm when a GradScaler
        handed its scale over (None otherwise: the plan's norm is reported)."""
        bn = getattr(self, "backward_norm", None)
        if bn is None or self.max_norm is None:  # the route takes the norm itself
            return StepClip(self.max_norm, self.norm_type, None, None, 1e-6, self.nonfinite), None
        total = bn.total_norm64()  # taken during backward
        scale = getattr(self, "grad_scale", None)
        if scale is None or total is None:
            return StepClip(self.max_norm, self.norm_type, total, None, 1e-6, self.nonfinite), None
        # GradScaler.step handed over its scale (see _step_supports_amp_scaling): the
        # gradients are scale times the true ones, so is their norm, and the update
        # multiplies them by the true clip coefficient divided by the scale.
        s = float(scale)
        total = total / s
        if isinstance(total, float):
            coef: Any = min(1.0, self.max_norm / (total + 1e-6)) / s
        else:
            coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0) / s
        return StepClip(None, self.norm_type, None, coef, 1e-6, self.nonfinite), total

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """With ``norm_in_backward``, ``torch.amp.GradScaler.step(opt)`` does not
        unscale the gradients (which would rewrite them without moving their
        version counters, leaving the hooks' norms stale): it sets ``grad_scale``
        and ``found_inf`` on the optimizer, as for torch's fused Adam, and the
        step divides by the scale and skips on inf itself."""
        return self.norm_in_backward

    def _amp_skips(self) -> bool:
        """Inside ``GradScaler.step`` (norm_in_backward only): whether an inf/NaN
        gradient skips this step (a host read of ``found_inf``)."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None or self.backward_norm is None:
            return False
        if getattr(self, "grad_scale", None) is None:
            # scaler.unscale_(opt) ran before scaler.step: the gradients were
            # rewritten behind the version counters, so measure them again
            self.backward_norm.invalidate()
        return bool(found_inf)

    def _begin_step(self, closure: Callable[[], Any] | None) -> tuple[Any, list[torch.Tensor]]:
        """``closure()``'s loss (None without one) and every group's gradients
        (none when a GradScaler found inf/NaN gradients: the step is skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._amp_skips():
            self.last_total_norm = None
            self.last_step_skipped = True
            return loss, []
        grads = self._all_grads()
        if not grads:
            self.last_total_norm = None
            self.last_step_skipped = False
        return loss, grads

    def _global_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The norm over every rank (one gather); a refusal of this rank's step, kept
        by ``_prepare``, travels in it so that every rank refuses together."""
        from fastclip.distributed._adaptive import Plan as _Plan
        from fastclip.distributed._reduce import OP_NORM, reduce_norms

        own = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        kw = (getattr(self, "_norm_plan", None) or _Plan()).resolve(grads, own)
        error, self._dist_error = self._dist_error, None

        def precheck() -> None:
            if error is not None:
                raise error

        red = reduce_norms(
            grads, self.norm_type, kw["group"], kw["replicated"], OP_NORM, None, None, True,
            kw["layout"], kw["tied"], precheck,
        )  # fmt: skip
        return red.total

    def _prepare(self, lists: list[Any], ams: Any) -> Any:
        """Validate and pack one fused launch before anything is written:
        AdamW (``ams`` a bool) or SGD (``ams`` None).  ``(backend, prepared)``."""
        reduced = self.max_norm is not None and self._distributed(lists[1])
        lists = _locals(lists)
        try:
            backend = self._backend(lists)
            return backend, backend.step_prepare(lists, ams, type(self).__name__)
        except Exception as exc:
            if not reduced:
                raise
            self._dist_error = exc  # raised on every rank by the norm's gather (_clip)
            return None, None

    def _run(
        self, prepared: Any, lists: list[Any], hparams: np.ndarray, plan: Any, sign: float, ams: Any
    ) -> None:
        """Launch a prepared step (one fused launch per dtype)."""
        backend, work = prepared
        backend.step_run(work, _locals(lists), hparams, plan, sign, ams)

    def __repr__(self) -> str:
        head = super().__repr__()
        return head.replace("(", f"(max_norm={self.max_norm}, ", 1) if self.max_norm else head
