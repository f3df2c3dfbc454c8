"""StableSPAMAdamW: Adam with adaptive spike clipping (AdaClip), adaptive gradient-norm
scaling (AdaGN) and momentum reset."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..adaptive import stable_spam_scale
from ._spam_base import SpamBase, check_beta, check_int, check_real, chunks
from ._spam_fused import check_fused, stable_spam_step

__all__ = ["StableSPAMAdamW", "stable_spam_scale"]


class StableSPAMAdamW(SpamBase):
    r"""Stable-SPAM (Huang et al. 2025): AdaClip, AdaGN and momentum reset on Adam.

    "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
    arXiv:2502.17055 [1]_; the reference is ``galore_torch/stablespam.py`` of
    github.com/TianjinYellow/StableSPAM (same defaults).  For each parameter at
    its step :math:`k` (optimizer step :math:`t`), with :math:`s` =
    :func:`fastclip.adaptive.stable_spam_scale`, :math:`\gamma_1, \gamma_2, \theta` =
    ``gamma1, gamma2, gamma3``:

    1. decoupled decay first: :math:`p \leftarrow p\,(1 - \mathrm{lr}\,\lambda)`;
    2. *AdaClip*: :math:`M \leftarrow \theta M + (1-\theta)\max|g|`,
       :math:`\hat M = M / (1-\theta^k)`; entries with :math:`|g| > \hat M` are
       scaled by :math:`\hat M / \max|g|`;
    3. *AdaGN*, with :math:`n = \|g\|_2` after the clip:
       :math:`a \leftarrow \gamma_1 s\, a + (1 - \gamma_1 s) n`,
       :math:`b \leftarrow \gamma_2 b + (1-\gamma_2) n^2`,
       :math:`g \leftarrow \frac{g}{n} \cdot \frac{a / (1-(\gamma_1 s)^k)}
       {\sqrt{b / (1-\gamma_2^k)} + \epsilon}` (if :math:`n > 0`);
    4. *reset*, if :math:`t \bmod` ``update_proj_gap`` :math:`= 0`: this step
       uses the bias correction of :math:`k = 1`, and the moments are zero
       afterwards (see Notes);
    5. Adam with :math:`\beta_1 s`: :math:`m \leftarrow \beta_1 s\,m +
       (1-\beta_1 s) g`, :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
       :math:`p \leftarrow p - \frac{\mathrm{lr}}{1-(\beta_1 s)^k}
       \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^k} + \epsilon}` (``amsgrad``: the running
       maximum of :math:`v`, never reset).

    Parameters
    ----------
    params : iterable
        Parameters or groups (``lr``, ``betas``, ``eps``, ``weight_decay``,
        ``amsgrad`` per group).
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0.0
    amsgrad : bool, default False
    gamma1 : float, default 0.7
        AdaGN's first-moment decay (the reference's -1 means ``betas[0]``; so does None).
    gamma2 : float, default 0.9
        AdaGN's second-moment decay.
    gamma3 : float, default 0.999
        AdaClip's decay :math:`\theta`.
    total_t : int, optional
        Total steps of the cosine ``scale`` (None: ``scale = 1``).
    eta_min : float, default 0.5
        The scale's floor.
    update_proj_gap : int, default 1000
        Reset interval; 0: never.
    nonfinite : {"propagate", "error", "skip"}, default "propagate"
        As :class:`SPAMAdamW`.
    fused : bool or None, default None
        As :class:`SPAMAdamW`: CPU tensors take Numba kernels, CUDA tensors
        (with CuPy) the CUDA kernels of ``spam_kernels.cu``
        (``fastclip_stable_spam``), with ``last_step_route`` ``"cpu"`` or
        ``"cuda"``; without CuPy, CUDA tensors take the ``_foreach`` route with
        None and raise TypeError with True.  The fused routes read the
        gradients three times (max :math:`|g|` per tensor, the norm after
        AdaClip, the update) and the parameters and moments once; their
        per-tensor scalars (AdaClip's and AdaGN's statistics) are computed in
        float64 on the host and stored in their tensors' dtype, where the
        ``_foreach`` route computes them in that dtype: equal to rounding.  On
        CUDA that costs three host synchronisations a step (the two
        reductions and the statistics' read), which the ``_foreach`` route
        does not make.

    Notes
    -----
    At a reset step the reference binds ``exp_avg``/``exp_avg_sq`` before it
    replaces them with zeros, so that step's update still uses the old moments
    (updated with this step's gradient) with the step-1 bias correction, and
    the next step starts from zero moments at :math:`k = 2`; AdaClip and AdaGN
    keep their statistics but take the restarted :math:`k` in their bias
    corrections.  This class does the same, so its trajectories are the
    reference's.  ``p.grad`` is left as it was (the reference writes
    AdaClip's result into it).

    References
    ----------
    .. [1] T. Huang, H. Hu, Z. Zhang, G. Jin, X. Li, L. Shen, T. Chen, L. Liu,
       Q. Wen, Z. Wang, S. Liu, "Stable-SPAM: How to Train in 4-Bit More Stably
       than 16-Bit Adam", 2025. https://arxiv.org/abs/2502.17055

    Examples
    --------
    >>> import torch
    >>> from fastclip.torch import StableSPAMAdamW
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> opt = StableSPAMAdamW([p], lr=0.1)
    >>> p.grad = torch.tensor([3.0, 4.0])
    >>> opt.step()  # step 1: AdaClip's bound is max|g| itself; AdaGN scales to norm ~1
    >>> p.data
    tensor([-0.1000, -0.1000])
    """

    _WHAT = "fastclip.torch.StableSPAMAdamW"
    _CUDA = True
    _COUNTERS = ("total_steps",)
    _POLICY_IN_STEP = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        gamma1: float | None = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        total_t: int | None = None,
        eta_min: float = 0.5,
        update_proj_gap: int = 1000,
        nonfinite: str = "propagate",
        fused: bool | None = None,
    ) -> None:
        w = self._WHAT
        self.fused = check_fused(w, fused)
        b = check_beta(w, betas)
        defaults = dict(
            lr=check_real(w, "lr", lr),
            betas=b,
            eps=check_real(w, "eps", eps),
            weight_decay=check_real(w, "weight_decay", weight_decay),
            amsgrad=bool(amsgrad),
        )
        self.gamma1 = b[0] if gamma1 is None or gamma1 == -1 else check_real(w, "gamma1", gamma1)
        self.gamma2 = check_real(w, "gamma2", gamma2)
        self.gamma3 = check_real(w, "gamma3", gamma3)
        for name, g in (("gamma1", self.gamma1), ("gamma2", self.gamma2), ("gamma3", self.gamma3)):
            if not g < 1:
                raise ValueError(f"{w}: {name} must be in [0, 1), got {g!r}")
        self.total_t = None if total_t is None else check_int(w, "total_t", total_t)
        self.eta_min = check_real(w, "eta_min", eta_min)
        self.update_proj_gap = check_int(w, "update_proj_gap", update_proj_gap)
        self._set_policy(nonfinite)
        super().__init__(params, defaults)
        self.total_steps = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Stable-SPAM step (see the class docstring); returns the closure's loss."""
        loss, work, route = self._start(closure)
        if work is None:
            return loss
        t = self.total_steps + 1
        scale = stable_spam_scale(t, self.total_t, self.eta_min)
        reset = self.update_proj_gap != 0 and t % self.update_proj_gap == 0
        if route != "foreach":
            if stable_spam_step(self, work, scale, reset):
                self.total_steps = t
            return loss
        for group, ps, gs in work:
            if ps:
                for c in chunks(ps):
                    self._group_step(group, ps[c], gs[c], scale, reset)
        self.total_steps = t
        return loss

    def _group_step(
        self,
        group: dict[str, Any],
        ps: list[torch.Tensor],
        gs: list[torch.Tensor],
        scale: float,
        reset: bool,
    ) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        if wd != 0:
            torch._foreach_mul_(ps, 1 - lr * wd)
        states = [self.state[p] for p in ps]
        for p, g, st in zip(ps, gs, states):
            if "exp_avg" not in st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for key in ("m_norm_t", "v_norm_t", "m_max_t"):
                    st[key] = torch.zeros((), dtype=g.dtype, device=g.device)
                if group["amsgrad"]:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for st in states:
            st["step"] += 1
        ks = [st["step"] for st in states]
        theta, g1s, g2 = self.gamma3, self.gamma1 * scale, self.gamma2
        # AdaClip: EMA of max|g|, bias-corrected; entries above it scaled by hat / max|g|
        maxg = torch._foreach_norm(gs, math.inf)
        mmax = [st["m_max_t"] for st in states]
        torch._foreach_mul_(mmax, theta)
        torch._foreach_add_(mmax, maxg, alpha=1 - theta)
        hats = torch._foreach_div(mmax, [1 - theta**k for k in ks])
        # the reference's g / max|g| * hat as g * (hat / max|g|): one pass, equal to rounding
        shrink = torch._foreach_div(hats, maxg)
        clipped = [torch.where(g.abs() > h, g * s, g) for g, h, s in zip(gs, hats, shrink)]
        # AdaGN: EMAs of the norm and the squared norm set the gradient's new norm
        norms = torch._foreach_norm(clipped)
        mn = [st["m_norm_t"] for st in states]
        vn = [st["v_norm_t"] for st in states]
        torch._foreach_mul_(mn, g1s)
        torch._foreach_add_(mn, norms, alpha=1 - g1s)
        torch._foreach_mul_(vn, g2)
        torch._foreach_addcmul_(vn, norms, norms, value=1 - g2)
        mhat = torch._foreach_div(mn, [1 - g1s**k for k in ks])
        vhat = torch._foreach_div(vn, [1 - g2**k for k in ks])
        torch._foreach_sqrt_(vhat)
        torch._foreach_add_(vhat, eps)
        cs = torch._foreach_div(mhat, vhat)
        # g / n * c as g * (c / n) (0-d factors, one multi-tensor pass); n = 0 keeps g
        factors = [torch.where(n > 0, c / n, 1.0) for n, c in zip(norms, cs)]
        scaled = torch._foreach_mul(clipped, factors)
        if reset:
            ks = [1] * len(ks)
        b1 = beta1 * scale
        ms = [st["exp_avg"] for st in states]
        vs = [st["exp_avg_sq"] for st in states]
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, scaled, alpha=1 - b1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, scaled, scaled, value=1 - beta2)
        if group["amsgrad"]:
            vmax = [st["max_exp_avg_sq"] for st in states]
            torch._foreach_maximum_(vmax, vs)
            denom = torch._foreach_sqrt(vmax)
        else:
            denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**k) for k in ks])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1 - b1**k) for k in ks])
        if reset:
            torch._foreach_zero_(ms)
            torch._foreach_zero_(vs)
            for st in states:
                st["step"] = 1
