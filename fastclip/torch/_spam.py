"""SPAMAdamW: Adam with spike-aware element-wise clipping and periodic momentum reset."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ._spam_base import SpamBase, check_beta, check_int, check_real, chunks
from ._spam_fused import check_fused, spam_step

__all__ = ["SPAMAdamW", "spam_warmup_scale", "spike_clip_tensors"]


def spam_warmup_scale(current_step: int, warmup_steps: int) -> float:
    r"""SPAM's update scale ``1 - d(s)`` after a momentum reset, ``s`` steps ago.

    The reference builds ``CosineDecay(0.99, W)``: torch's
    ``CosineAnnealingLR(T_max=W + 1, eta_min=0)`` from 0.99, read at epoch ``s``
    (its closed form), and 0 from ``s >= W`` on:
    :math:`d(s) = 0.99\,(1 + \cos(\pi s / (W + 1))) / 2` for :math:`s < W`.
    """
    if current_step >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1 + math.cos(math.pi * current_step / (warmup_steps + 1))) / 2


def spike_clip_tensors(
    gs: list[torch.Tensor], vs: list[torch.Tensor], theta: float
) -> list[torch.Tensor]:
    """Clipped copies of ``gs``: ``sign(g) sqrt(theta v)`` where ``g**2 > theta v``.

    On the CPU, the reference's masked assignment: the square root only of the
    masked entries (a full-tensor sqrt cost ~6 multiplies' time in torch 2.13's
    CPU kernels, measured in the SPAM step's profile), and exact.  On a device, a
    clamp to ``+-sqrt(theta v)`` (no host synchronisation for the mask), equal
    except for ``|g|`` within rounding of the bound and for a NaN ``v`` (the clamp
    gives NaN, the mask keeps ``g``; the parameter is NaN either way).
    """
    if gs[0].device.type == "cpu":
        bounds = torch._foreach_mul(vs, theta)
        squares = torch._foreach_mul(gs, gs)
        out = []
        for g, sq, b in zip(gs, squares, bounds):
            mask = sq > b
            c = g.clone()
            if bool(mask.any()):
                c[mask] = c[mask].sign() * b[mask].sqrt()
            out.append(c)
        return out
    bound = torch._foreach_mul(vs, theta)
    torch._foreach_sqrt_(bound)
    clipped = list(torch._foreach_minimum(gs, bound))
    torch._foreach_neg_(bound)
    torch._foreach_maximum_(clipped, bound)
    return clipped


class SPAMAdamW(SpamBase):
    r"""SPAM: Adam with spike-aware clipping and momentum reset (Huang et al. 2025).

    "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
    arXiv:2501.06842 [1]_; the reference is ``galore_torch/SPAM.py`` of
    github.com/TianjinYellow/SPAM-Optimizer (its ``AdamW`` class: the same
    defaults).  At step :math:`t` (1-based, over the optimizer), with
    :math:`\Delta T` = ``delta_t``, :math:`N` = ``grad_accu_steps``,
    :math:`\theta` = ``threshold``:

    1. *Momentum reset*: if :math:`t \bmod \Delta T = 0`, :math:`m = v = 0`
       (the per-parameter step count, used in the bias correction, is kept).
    2. *Spike clipping*, once :math:`t \ge N` and :math:`t \bmod \Delta T \ge N`
       (no clipping in the first :math:`N` steps after a reset):
       where :math:`g^2 > \theta\, v_{t-1}`, :math:`g \leftarrow \mathrm{sign}(g)
       \sqrt{\theta\, v_{t-1}}`.
    3. Adam: :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
       :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
       :math:`p \leftarrow p - \eta_t \frac{\sqrt{1-\beta_2^k}}{1-\beta_1^k}
       \frac{m}{\sqrt v + \epsilon}` (``correct_bias``; :math:`k` the
       parameter's step count), then decoupled decay
       :math:`p \leftarrow p - \mathrm{lr}\,\lambda\, p`.
    4. :math:`\eta_t = \mathrm{lr}\,(1 - d(s))`, with :math:`s` the steps since
       the last reset and :math:`d` the cosine warm-up of
       :func:`spam_warmup_scale` (:math:`\eta_t = \mathrm{lr}` before the first
       reset).

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups (``lr``, ``betas``, ``eps``,
        ``weight_decay``, ``correct_bias`` may differ per group).
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-6
        Added to :math:`\sqrt v` (not bias-corrected, as the reference).
    weight_decay : float, default 0.0
    correct_bias : bool, default True
    threshold : float, default 5000
        :math:`\theta`; 0 turns spike clipping off.
    delta_t : int, default 500
        :math:`\Delta T`, the reset interval (the reference's ``DeltaT``); 0:
        no resets (the reference would divide by zero) and clipping from step
        :math:`N` on.
    warmup_steps : int, default 150
        Length of the cosine warm-up after a reset.
    grad_accu_steps : int, default 20
        :math:`N`.
    nonfinite : {"propagate", "error", "skip"}, default "propagate"
        "propagate" is the reference's behaviour (a NaN gradient is never
        clipped); "error" raises :class:`fastclip.NonFiniteNormError` and
        "skip" skips the step (``last_step_skipped``), in both cases before any
        parameter, moment or counter changes.
    fused : bool or None, default None
        The route of the update.  None: the fused one-pass kernels where every
        parameter with a gradient is a CPU tensor (Numba) or a CUDA tensor
        (CUDA, with CuPy) of float16, bfloat16, float32 or float64 whose
        gradient has its dtype, else torch's multi-tensor operations
        (``_foreach``); True: the fused kernels, or TypeError naming the
        parameter that cannot take them; False: the ``_foreach`` operations.
        ``last_step_route`` says which route the last step took (``"cpu"``,
        ``"cuda"`` or ``"foreach"``).  The state dict is the same in every
        route (same keys, dtypes, and values to within rounding), so a
        checkpoint of one route continues in another.

    Notes
    -----
    Differences from the reference, all deliberate: ``p.grad`` is left as it
    was (the reference writes the clipped values into it); on CUDA the clip
    is ``clamp(g, -sqrt(theta v), sqrt(theta v))`` (no host synchronisation),
    equal to the reference's masked assignment (used on the CPU) except for
    ``|g|`` within rounding of the bound; GaLore's ``density`` masks are not
    supported.

    The fused route reads and writes each element of the parameter, the
    gradient and both moments once per step (one kernel launch per dtype for
    every group together), where the ``_foreach`` route makes about ten
    passes (over the whole list on a device and over cache-sized chunks on the
    CPU).  Both compute the same operations in the same order in the
    storage's arithmetic type (float32 for 16- and 32-bit parameters); 16-bit
    parameters are rounded once per step in the fused route, after every
    operation in the ``_foreach`` route.  The clip on CUDA is the masked
    assignment in the fused kernel, the clamp above in the ``_foreach`` route.

    References
    ----------
    .. [1] T. Huang, Z. Zhu, G. Jin, L. Liu, Z. Wang, S. Liu, "SPAM:
       Spike-Aware Adam with Momentum Reset for Stable LLM Training", ICLR 2025.
       https://arxiv.org/abs/2501.06842

    Examples
    --------
    >>> import torch
    >>> from fastclip.torch import SPAMAdamW
    >>> p = torch.nn.Parameter(torch.zeros(3))
    >>> opt = SPAMAdamW([p], lr=0.1, betas=(0.9, 0.5), grad_accu_steps=2, threshold=4.0)
    >>> p.grad = torch.tensor([1.0, -1.0, 0.5])
    >>> opt.step()  # step 1 < grad_accu_steps: no clipping; v = 0.5 g^2
    >>> p.grad = torch.tensor([1.0, 1.0, 1e6])  # the last element spikes
    >>> opt.step()  # 1e6 is clipped to sqrt(4 * 0.125) = 0.7071
    >>> opt.state[p]["exp_avg"]  # 0.9 m + 0.1 g
    tensor([0.1900, 0.0100, 0.1157])
    """

    _WHAT = "fastclip.torch.SPAMAdamW"
    _COUNTERS = ("total_step", "current_step")
    _CUDA = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        threshold: float = 5000.0,
        delta_t: int = 500,
        warmup_steps: int = 150,
        grad_accu_steps: int = 20,
        nonfinite: str = "propagate",
        fused: bool | None = None,
    ) -> None:
        w = self._WHAT
        self.fused = check_fused(w, fused)
        defaults = dict(
            lr=check_real(w, "lr", lr),
            betas=check_beta(w, betas),
            eps=check_real(w, "eps", eps),
            weight_decay=check_real(w, "weight_decay", weight_decay),
            correct_bias=bool(correct_bias),
        )
        self.threshold = check_real(w, "threshold", threshold)
        self.delta_t = check_int(w, "delta_t", delta_t)
        self.warmup_steps = check_int(w, "warmup_steps", warmup_steps)
        self.grad_accu_steps = check_int(w, "grad_accu_steps", grad_accu_steps)
        self._set_policy(nonfinite)
        super().__init__(params, defaults)
        self.total_step = 0
        # The reference starts past the warm-up (scale 1) until the first reset.
        self.current_step = self.warmup_steps + 1

    def _clips(self, t: int) -> bool:
        if self.threshold == 0 or t < self.grad_accu_steps:
            return False
        return self.delta_t == 0 or t % self.delta_t >= self.grad_accu_steps

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SPAM step (see the class docstring); returns the closure's loss."""
        loss, work, route = self._start(closure)
        if work is None:
            return loss
        t = self.total_step + 1
        scale = spam_warmup_scale(self.current_step, self.warmup_steps)
        reset = self.delta_t > 0 and t % self.delta_t == 0
        clips = self._clips(t)
        if route != "foreach":
            spam_step(self, work, scale, reset, clips)
        else:
            for group, ps, gs in work:
                if not ps:
                    continue
                for c in chunks(ps):
                    self._group_step(group, ps[c], gs[c], scale, reset, clips)
        self.total_step += 1
        self.current_step += 1
        if self.delta_t > 0 and (self.total_step + 1) % self.delta_t == 0:
            self.current_step = 0  # the next step resets the moments and restarts the warm-up
        return loss

    def _group_step(
        self,
        group: dict[str, Any],
        ps: list[torch.Tensor],
        gs: list[torch.Tensor],
        scale: float,
        reset: bool,
        clips: bool,
    ) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in ps]
        for p, st in zip(ps, states):
            if "exp_avg" not in st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        ms = [st["exp_avg"] for st in states]
        vs = [st["exp_avg_sq"] for st in states]
        if reset:
            torch._foreach_zero_(ms)
            torch._foreach_zero_(vs)
        for st in states:
            st["step"] += 1
        if clips:
            gs = spike_clip_tensors(gs, vs, self.threshold)
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, gs, alpha=1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, group["eps"])
        alphas = []
        for st in states:
            size = group["lr"]
            if group["correct_bias"]:
                size *= math.sqrt(1.0 - beta2 ** st["step"]) / (1.0 - beta1 ** st["step"])
            alphas.append(-size * scale)
        # p += alpha * m / denom in one pass (the reference's p.add_(m / denom, alpha):
        # equal to rounding)
        torch._foreach_addcdiv_(ps, ms, denom, alphas)
        if group["weight_decay"] > 0:
            # after the update, unscaled by the warm-up: p.add_(p, alpha=-lr * wd), as the reference
            torch._foreach_add_(ps, ps, alpha=-group["lr"] * group["weight_decay"])
