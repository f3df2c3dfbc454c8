"""``FusedAdamW`` and ``FusedSGD``: torch optimizers that clip and update in one fused pass.

Re-exported by ``fastclip.torch``.  Importing this module imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fastclip._hparams import adamw_hparams, sgd_hparams
from fastclip.optim import _functional as F  # check_adamw_args, check_sgd_args

from ._fused_base import FusedOptimizerBase

__all__ = ["FusedAdamW", "FusedSGD"]


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps "step" as a float32 0-d tensor (float64 when that is the default dtype)
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _lr_value(lr: Any) -> Any:
    """The value of ``lr`` to check: a float for a 0-d tensor (kept as given in the
    param groups)."""
    return float(lr) if isinstance(lr, torch.Tensor) else lr


class FusedAdamW(FusedOptimizerBase):
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
    norm_in_backward : bool, default False
        Take the global norm during ``backward()`` (with ``max_norm``): a
        :class:`BackwardNorm` (``self.backward_norm``) hooks every parameter,
        each gradient's norm is taken as autograd accumulates it, and
        ``step()`` clips with their combination instead of reading every
        gradient once more first.  Same results as without it; gradients
        written after their hook (``zero_grad``, ``GradScaler.unscale_``,
        DDP's all-reduce) are measured again at the step (see
        :class:`BackwardNorm` for its limits).
    norm_plan : fastclip.distributed.Plan, optional
        Parameters sharded over ranks (DTensors on any meshes, or plain
        tensors with a layout): the global norm is reduced over every rank
        (one gather, :func:`fastclip.distributed.global_norm`), so every rank
        clips by the same coefficient.  DTensor parameters are stepped through
        their local shards (a plan is implied for them).

    Attributes
    ----------
    last_total_norm : torch.Tensor or None
        The global gradient norm before clipping of the last step (with ``max_norm``).
    last_step_skipped : bool

    Notes
    -----
    With ``norm_in_backward=True`` the step makes no norm pass (one fused
    launch per dtype that reads each gradient once, to update).

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
    >>> from fastclip.torch import FusedAdamW
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = FusedAdamW(model.parameters(), lr=1e-3, max_norm=1.0)
    >>> model(torch.ones(3, 4)).pow(2).sum().backward()
    >>> opt.step()
    >>> bool(opt.last_total_norm > 0)
    True
    """

    STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

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
        norm_in_backward: bool = False,
        norm_plan: Any = None,
    ) -> None:
        # A tensor lr stays a tensor in param_groups, as torch's AdamW keeps it (schedulers
        # may write it in place); each step reads its value.
        F.check_adamw_args(_lr_value(lr), betas[0], betas[1], eps, weight_decay)
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
        self._setup_clip(max_norm, norm_type, nonfinite, norm_in_backward, norm_plan)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One clip-and-AdamW step over all groups; returns ``closure()``'s loss if given.

        Every group is validated before the norm is computed and anything is
        written; new state and step counts are stored only after the kernels
        ran, so a refused or skipped step leaves the optimizer as it was.
        """
        if torch.compiler.is_compiling():  # Dynamo cannot trace numba: a custom op
            return self._traced_step(closure)
        loss, grads = self._begin_step(closure)
        if grads:
            self._update(grads)
        return loss

    def _update(self, grads: list[torch.Tensor]) -> None:
        grads_backend = self._backend([grads])  # checked once: the plan reuses it
        gpu = grads_backend.on_gpu
        launches: dict[tuple[bool, bool], list[list[Any]]] = {}
        fresh: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        old_steps: list[torch.Tensor] = []
        new_steps: list[torch.Tensor] = []
        for group in self.param_groups:
            lists = self._group_lists(group, gpu, fresh, old_steps, new_steps)
            if lists is None:
                continue
            key = (bool(group["amsgrad"]), bool(group["maximize"]))
            entry = launches.setdefault(key, [[], [], [], [], [], []])
            for k, lst in enumerate(lists):
                entry[k] += lst
        work = []
        for (ams, maximize), lists in launches.items():  # one launch per key and dtype
            arrays = [*lists[:4], lists[4] if ams else None]
            work.append((self._prepare(arrays, ams), arrays, lists[5], ams, maximize))
        plan = self._clip(grads, grads_backend)
        if plan.skip:
            return
        for prepared, arrays, rows, ams, maximize in work:
            hps = np.concatenate(rows)
            self._run(prepared, arrays, hps, plan, -1.0 if maximize else 1.0, ams)
        for p, state in fresh:
            self.state[p].update(state)
        if old_steps:
            torch._foreach_copy_(old_steps, new_steps)

    def _group_lists(
        self,
        group: dict[str, Any],
        on_gpu: bool,
        fresh: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
        old_steps: list[torch.Tensor],
        new_steps: list[torch.Tensor],
    ) -> list[list[Any]] | None:
        """[params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, [hparams rows]] of the
        group's parameters that have a gradient, or None when none has.

        Nothing is stored here: state a parameter lacks is created and appended
        to ``fresh`` (stored by ``step`` after the kernels ran), and the advanced
        step counts are new tensors in ``new_steps`` (copied into ``old_steps``,
        the existing ones, after the kernels ran).
        """
        ps: list[torch.Tensor] = []
        gs: list[torch.Tensor] = []
        ms: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        xs: list[torch.Tensor] = []
        olds: list[torch.Tensor] = []
        olds_at: list[int] = []
        amsgrad = bool(group["amsgrad"])
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state.get(p)
            if not state:
                state = {
                    # "step" lives on the host, as torch's non-capturable AdamW keeps it
                    "step": torch.tensor(1.0, dtype=_scalar_dtype()),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                fresh.append((p, state))
            else:
                step = state["step"]
                if on_gpu and step.is_cuda:
                    raise ValueError(
                        "FusedAdamW keeps step counts on the host (torch's non-capturable "
                        "layout); move state['step'] to the CPU"
                    )
                olds_at.append(len(ps))
                olds.append(step)
            ps.append(p)
            gs.append(p.grad)
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
            if amsgrad:
                xs.append(state["max_exp_avg_sq"])
        if not ps:
            return None
        counts = [1.0] * len(ps)  # new state: this is its first step
        if olds:
            # one foreach op, in the counts' own dtype, as torch's in-place increment
            news = torch._foreach_add(olds, 1)
            old_steps += olds
            new_steps += news
            values = torch.stack(news).tolist() if len(news) > 1 else [float(news[0])]
            for i, value in zip(olds_at, values):
                counts[i] = value
        beta1, beta2 = (float(b) for b in group["betas"])
        hparams = adamw_hparams(
            counts,
            float(group["lr"]),
            beta1,
            beta2,
            float(group["eps"]),
            float(group["weight_decay"]),
        )
        return [ps, gs, ms, vs, xs, [hparams]]


class FusedSGD(FusedOptimizerBase):
    r"""Drop-in ``torch.optim.SGD`` whose step clips and updates in one fused pass.

    Same constructor arguments, defaults and state (``momentum_buffer``) as
    ``torch.optim.SGD``, plus ``max_norm``, ``norm_type`` and ``nonfinite`` as
    :class:`FusedAdamW`; the first step sets the momentum buffer to the
    (clipped) gradient, as torch does; ``norm_in_backward`` and ``norm_plan`` as
    :class:`FusedAdamW`.  CPU and CUDA tensors, with
    :class:`FusedAdamW`'s host-sync rules on CUDA (one launch per parameter
    group and dtype).

    Examples
    --------
    >>> import torch
    >>> from fastclip.torch import FusedSGD
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> opt = FusedSGD([w], lr=1.0, momentum=0.9, max_norm=1.0)
    >>> w.grad = torch.tensor([3.0, 4.0])
    >>> opt.step()
    >>> w.detach()
    tensor([-0.6000, -0.8000])
    """

    STATE_KEYS = ("momentum_buffer",)

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
        norm_in_backward: bool = False,
        norm_plan: Any = None,
    ) -> None:
        F.check_sgd_args(_lr_value(lr), momentum, dampening, weight_decay, nesterov)
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
        self._setup_clip(max_norm, norm_type, nonfinite, norm_in_backward, norm_plan)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One clip-and-SGD step over all groups; returns ``closure()``'s loss if given.

        Every group is validated before the norm is computed and anything is
        written; new momentum buffers are stored only after the kernels ran, so
        a refused or skipped step never leaves an unset buffer marked as set.
        """
        if torch.compiler.is_compiling():  # Dynamo cannot trace numba: a custom op
            return self._traced_step(closure)
        loss, grads = self._begin_step(closure)
        if grads:
            self._update(grads)
        return loss

    def _update(self, grads: list[torch.Tensor]) -> None:
        work = []
        fresh: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            ps, gs, bufs, first = [], [], [], []
            momentum = float(group["momentum"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                ps.append(p)
                gs.append(p.grad)
                if momentum != 0:
                    state = self.state.get(p)
                    buf = None if not state else state.get("momentum_buffer")
                    first.append(buf is None)
                    if buf is None:  # set to the gradient by the first-step kernel
                        buf = torch.empty_like(p, memory_format=torch.preserve_format)
                        fresh.append((p, buf))
                    bufs.append(buf)
            if not ps:
                continue
            hparams = sgd_hparams(
                len(ps),
                float(group["lr"]),
                momentum,
                float(group["dampening"]),
                float(group["weight_decay"]),
                bool(group["nesterov"]),
                first or None,
            )
            lists = [ps, gs, bufs if momentum != 0 else None]
            sign = -1.0 if group["maximize"] else 1.0
            work.append((self._prepare(lists, None), lists, hparams, sign))
        plan = self._clip(grads)
        if plan.skip:
            return
        for prepared, lists, hparams, sign in work:  # one launch per group and dtype
            self._run(prepared, lists, hparams, plan, sign, None)
        for p, buf in fresh:
            self.state[p]["momentum_buffer"] = buf


for _cls in (FusedAdamW, FusedSGD):
    _cls.__module__ = "fastclip.torch"  # the public path: reprs, docs and pickles name it
del _cls
