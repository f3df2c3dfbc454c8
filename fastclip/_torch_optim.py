"""PyTorch integration: ``ClippedOptimizer`` and the fused ``FusedAdamW`` / ``FusedSGD``.

Re-exported by ``fastclip.torch``.  Importing this module imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from .optim import _functional as F

__all__ = ["ClippedOptimizer", "FusedAdamW", "FusedSGD"]


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps "step" as a float32 0-d tensor (float64 when that is the default dtype)
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _FusedBase(Optimizer):
    """Shared clip logic of the fused optimizers."""

    max_norm: float | None
    norm_type: float
    nonfinite: str
    last_total_norm: torch.Tensor | None
    last_step_skipped: bool

    def _setup_clip(self, max_norm: float | None, norm_type: float, nonfinite: str) -> None:
        if max_norm is not None:
            F.check_max_norm(max_norm)
        F.check_ord(norm_type)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.norm_type = float(norm_type)
        self.nonfinite = F.check_nonfinite(nonfinite)
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

    def _clip(self, grads: list[torch.Tensor]) -> F.Clip | None:
        """Norm and coefficient over every gradient of every group (None: nothing to do)."""
        self.last_step_skipped = False
        if not grads:
            self.last_total_norm = None
            return None
        if F.is_gpu(grads[0]):
            return self._clip_gpu(grads)
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
        self.last_total_norm = (
            None if plan.norm is None else torch.tensor(plan.norm, dtype=torch.float32)
        )
        self.last_step_skipped = plan.skip
        return plan

    def _begin_step(self, closure: Callable[[], Any] | None) -> tuple[Any, Any]:
        """``closure()``'s loss (None without one) and the clip plan of all gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        return loss, self._clip(self._all_grads())

    def _clip_gpu(self, grads: list[torch.Tensor]) -> Any:
        """The GPU plan: device norm and coefficient (``_gpu._optim.GpuClip``).

        No host sync, except ``nonfinite="error"`` and ``"skip"``: both read the
        norm back once, "skip" because the step counts (AdamW) and first-step
        momentum buffers (SGD) are decided on the host.
        """
        from ._gpu import _driver
        from ._gpu import _optim as G

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

    def _launch_gpu(
        self, lists: list[Any], hp: np.ndarray, plan: Any, sign: float, ams: Any
    ) -> None:
        """One fused GPU launch per dtype: AdamW (``ams`` a bool) or SGD (``ams`` None)."""
        from ._gpu import _driver
        from ._gpu import _optim as G

        what = type(self).__name__
        lib = F.gpu_lib(lists, what)
        with _driver._on_device(lib, lists[0][0]):
            if ams is None:
                step = G.Step(lib, lists, [True, False, True], what)
                step.launch_sgd(hp, plan, sign)
            else:
                step = G.Step(lib, lists, [True, False, True, True, True], what)
                step.launch_adamw(hp, plan, sign, ams)
            lib.touched(lists[0])

    def __repr__(self) -> str:
        head = super().__repr__()
        return head.replace("(", f"(max_norm={self.max_norm}, ", 1) if self.max_norm else head


class FusedAdamW(_FusedBase):
    r"""Drop-in ``torch.optim.AdamW`` whose step clips and updates in one fused pass.

    Same constructor arguments, defaults, ``param_groups`` and per-parameter
    state (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) as
    ``torch.optim.AdamW``, so state dicts load both ways, plus:

    Parameters
    ----------
    max_norm : float, optional
        Clip the global gradient norm (over every parameter of every group) to
        ``max_norm`` inside the step: ``step()`` then equals
        ``clip_grad_norm_(params, max_norm, norm_type)`` followed by
        ``AdamW.step()``, except that ``p.grad`` is left unclipped.
    norm_type : float, default 2
        Order of the global norm.
    nonfinite : {"propagate", "error", "skip"}
        A NaN/inf norm: update with the non-finite coefficient (torch's
        behaviour: NaN parameters), raise :class:`fastclip.NonFiniteNormError`
        before any write, or skip the step (``last_step_skipped`` is True,
        state and step counts untouched).

    Attributes
    ----------
    last_total_norm : torch.Tensor or None
        The global gradient norm before clipping of the last step (with ``max_norm``).
    last_step_skipped : bool

    Notes
    -----
    CPU tensors (one fused Numba kernel launch per dtype for all groups) and
    CUDA tensors (one fused CUDA kernel launch per dtype, on torch's current
    stream: ``fastclip.optim.adamw_step_``'s GPU route); float16, bfloat16,
    float32, float64.  On CUDA ``step()`` never waits for the device (step
    counts stay CPU tensors, as torch's non-capturable AdamW keeps them;
    ``last_total_norm`` is a device tensor), except with ``nonfinite="error"``
    or ``"skip"``, which read the norm back once to decide on the host.
    ``foreach`` and ``fused``
    are accepted and ignored; ``capturable`` and ``differentiable`` are not
    supported.  Works with ``torch.amp.GradScaler`` (``scaler.step(opt)``
    unscales first and skips the step on inf/NaN).

    Examples
    --------
    >>> import torch
    >>> from fastclip._torch_optim import FusedAdamW  # re-exported as fastclip.torch.FusedAdamW
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = FusedAdamW(model.parameters(), lr=1e-3, max_norm=1.0)
    >>> model(torch.ones(3, 4)).pow(2).sum().backward()
    >>> opt.step()
    >>> bool(opt.last_total_norm > 0)
    True
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        nonfinite: str = "propagate",
    ) -> None:
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if capturable or differentiable:
            raise ValueError("FusedAdamW supports neither capturable nor differentiable")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=False,
            differentiable=False,
            fused=fused,
            decoupled_weight_decay=True,
        )
        super().__init__(params, defaults)
        self._setup_clip(max_norm, norm_type, nonfinite)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One clip-and-AdamW step over all groups; returns ``closure()``'s loss if given."""
        loss, plan = self._begin_step(closure)
        if plan is None or plan.skip:
            return loss
        if not isinstance(plan, F.Clip):
            self._step_gpu(plan)
            return loss
        launches: dict[tuple[bool, float], list[list[Any]]] = {}
        for group in self.param_groups:
            lists = self._group_lists(group, on_gpu=False)
            if lists is None:
                continue
            coef = -plan.coef if group["maximize"] else plan.coef
            entry = launches.setdefault((bool(group["amsgrad"]), coef), [[], [], [], [], [], []])
            for k, lst in enumerate(lists):
                entry[k] += lst
        for (ams, c), lists in launches.items():  # one launch per (amsgrad, sign) and dtype
            lib = F.cpu_lib(lists[0], "FusedAdamW")
            xs_or_none = lists[4] if ams else None
            hps = np.concatenate(lists[5])
            F.launch_adamw(lib, lists[0], lists[1], lists[2], lists[3], xs_or_none, hps, c)
        return loss

    def _group_lists(self, group: dict[str, Any], on_gpu: bool) -> list[list[Any]] | None:
        """[params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, [hp rows]] of the
        group's parameters that have a gradient (state created on first use, step
        counts advanced), or None when none has."""
        ps, gs, ms, vs, xs, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())  # on the host, as torch
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            ps.append(p)
            gs.append(p.grad)
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                xs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        if not ps:
            return None
        if on_gpu and any(s.is_cuda for s in steps):
            raise ValueError(
                "FusedAdamW keeps step counts on the host (torch's non-capturable "
                "layout); move state['step'] to the CPU"
            )
        torch._foreach_add_(steps, 1)
        counts = torch.stack(steps).tolist() if len(steps) > 1 else [float(steps[0])]
        beta1, beta2 = (float(b) for b in group["betas"])
        hp = F.adamw_hparams(
            counts,
            float(group["lr"]),
            beta1,
            beta2,
            float(group["eps"]),
            float(group["weight_decay"]),
        )
        return [ps, gs, ms, vs, xs, [hp]]

    def _step_gpu(self, plan: Any) -> None:
        """``step`` on CUDA tensors: one launch per (amsgrad, maximize) and dtype, no sync."""
        launches: dict[tuple[bool, bool], list[list[Any]]] = {}
        for group in self.param_groups:
            lists = self._group_lists(group, on_gpu=True)
            if lists is None:
                continue
            key = (bool(group["amsgrad"]), bool(group["maximize"]))
            entry = launches.setdefault(key, [[], [], [], [], [], []])
            for k, lst in enumerate(lists):
                entry[k] += lst
        for (ams, maximize), lists in launches.items():
            hps = np.concatenate(lists[5])
            sign = -1.0 if maximize else 1.0
            self._launch_gpu([*lists[:4], lists[4] if ams else None], hps, plan, sign, ams)


class FusedSGD(_FusedBase):
    r"""Drop-in ``torch.optim.SGD`` whose step clips and updates in one fused pass.

    Same constructor arguments, defaults and state (``momentum_buffer``) as
    ``torch.optim.SGD``, plus ``max_norm``, ``norm_type`` and ``nonfinite`` as
    :class:`FusedAdamW`; the first step sets the momentum buffer to the
    (clipped) gradient, as torch does.  CPU and CUDA tensors, with
    :class:`FusedAdamW`'s host-sync rules on CUDA (one launch per parameter
    group and dtype).

    Examples
    --------
    >>> import torch
    >>> from fastclip._torch_optim import FusedSGD  # re-exported as fastclip.torch.FusedSGD
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> opt = FusedSGD([w], lr=1.0, momentum=0.9, max_norm=1.0)
    >>> w.grad = torch.tensor([3.0, 4.0])
    >>> opt.step()
    >>> w.detach()
    tensor([-0.6000, -0.8000])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        nonfinite: str = "propagate",
    ) -> None:
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise ValueError("FusedSGD does not support differentiable=True")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=False,
            fused=fused,
        )
        super().__init__(params, defaults)
        self._setup_clip(max_norm, norm_type, nonfinite)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One clip-and-SGD step over all groups; returns ``closure()``'s loss if given."""
        loss, plan = self._begin_step(closure)
        if plan is None or plan.skip:
            return loss
        gpu = not isinstance(plan, F.Clip)
        for group in self.param_groups:
            ps, gs, bufs, first = [], [], [], []
            momentum = float(group["momentum"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                ps.append(p)
                gs.append(p.grad)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    first.append(buf is None)
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.empty_like(
                            p, memory_format=torch.preserve_format
                        )
                    bufs.append(buf)
            if not ps:
                continue
            hp = F.sgd_hparams(
                len(ps),
                float(group["lr"]),
                momentum,
                float(group["dampening"]),
                float(group["weight_decay"]),
                bool(group["nesterov"]),
                first or None,
            )
            if gpu:  # one launch per group and dtype, no host sync
                sign = -1.0 if group["maximize"] else 1.0
                self._launch_gpu([ps, gs, bufs if momentum != 0 else None], hp, plan, sign, None)
                continue
            coef = -plan.coef if group["maximize"] else plan.coef
            lib = F.cpu_lib(ps, "FusedSGD")
            F.launch_sgd(lib, ps, gs, bufs if momentum != 0 else None, hp, coef)
        return loss


class ClippedOptimizer(Optimizer):
    r"""Wrap any ``torch.optim.Optimizer`` so that every ``step()`` clips first.

    ``step()`` calls ``clipper(grads, params)`` on the gradients of all
    parameters that have one (under ``torch.no_grad()``), then the wrapped
    optimizer's ``step()``.  ``clipper`` is any callable with that signature:
    a :mod:`fastclip.adaptive` clipper (``GlobalNormClipper``, ``AutoClip``,
    ``ZClip``, ``AGC``) or your own.

    ``param_groups``, ``state`` and ``defaults`` *are* the wrapped optimizer's
    (shared objects), so learning-rate schedulers and ``zero_grad`` act on it.
    ``state_dict()`` holds both the optimizer's and the clipper's state.

    With ``torch.amp.GradScaler`` call ``scaler.step(clipped)``: the scaler
    unscales the gradients first, then skips the whole step (clipper
    included, so its statistics never see the bad step) when it finds inf or
    NaN, exactly as it does for a plain optimizer.

    Attributes
    ----------
    last_total_norm : the clipper's return value of the last step.

    Examples
    --------
    >>> import torch
    >>> from fastclip.adaptive import ZClip
    >>> from fastclip._torch_optim import ClippedOptimizer  # re-exported as fastclip.torch.ClippedOptimizer
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ZClip())
    >>> model(torch.ones(2, 4)).sum().backward()
    >>> opt.step()
    >>> opt.clipper.state_dict()["step"]
    1
    """

    def __init__(self, optimizer: Optimizer, clipper: Callable[..., Any]) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if not callable(clipper):
            raise TypeError("clipper must be callable as clipper(grads, params)")
        super().__init__([torch.zeros(0)], {})  # hooks and bookkeeping; groups replaced below
        self.optimizer = optimizer
        self.clipper = clipper
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self.last_total_norm: Any = None

    def _params_and_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params, grads = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
        return params, grads

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` (if any), clip every gradient, then step the wrapped optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads = self._params_and_grads()
        if grads:
            self.last_total_norm = self.clipper(grads, params)
        if getattr(self.clipper, "last_step_skipped", False):
            return loss
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "optimizer", None) is None:  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"optimizer": wrapped.state_dict(), "clipper": clipper.state_dict()}``."""
        sd: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if hasattr(self.clipper, "state_dict"):
            sd["clipper"] = self.clipper.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if "clipper" in state_dict and hasattr(self.clipper, "load_state_dict"):
            self.clipper.load_state_dict(state_dict["clipper"])
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def __repr__(self) -> str:
        return f"ClippedOptimizer({self.optimizer!r}, clipper={self.clipper!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
