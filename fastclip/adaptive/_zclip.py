"""ZClip: z-score clipping of gradient-norm spikes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .._validate import check_eps, check_max_norm
from ._base import (
    bool_param,
    choice_param,
    int_param,
    ord_value,
    real_param,
    recorded_norms,
    recorded_statistic,
    settle_nothing,
)
from ._global import GlobalNormBased

__all__ = ["ZClip"]


def _square(d: float) -> float:
    """``d ** 2`` (the reference's expression, bit for bit: ``d * d`` can round
    differently), inf where Python's float ``**`` raises OverflowError (|d| > 1e154)."""
    try:
        return d**2
    except OverflowError:
        return math.inf


def _ieee_div(a: float, b: float) -> float:
    """``a / b`` with IEEE's answer for ``b == 0`` (inf or NaN) instead of ZeroDivisionError
    (ZClip's z-score with ``eps=0`` after a warm-up of equal norms)."""
    if b != 0:
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


class ZClip(GlobalNormBased):
    r"""ZClip: z-score clipping of gradient-norm spikes against EMA statistics.

    Kumar, Owen, Ashraf, Wei, Qiu, Li (2025), "ZClip: Adaptive Spike Mitigation
    for LLM Pre-Training", arXiv:2504.02507 [1]_; reference implementation
    ``zclip.py`` of github.com/bluorion-com/ZClip.  With :math:`g_t` the global
    norm of step :math:`t`:

    *Warm-up* (the first ``warmup_steps`` calls): the norms are collected (not
    clipped, except by ``max_norm``); after the last one,
    :math:`\mu = \mathrm{mean}(g_{1..W})`, :math:`\sigma^2 = \mathrm{var}(g_{1..W})`
    (population variance).

    *Then*, with :math:`\sigma = \sqrt{\sigma^2}` and
    :math:`z_t = (g_t - \mu) / (\sigma + \epsilon)`:

    * ``mode="zscore"``: a spike is :math:`z_t > z_\mathrm{thres}`; it is clipped to

      - ``clip_option="adaptive_scaling"`` (default, the paper's *reciprocal*
        clipping): :math:`g^*_t = c_f\,\big(\mu + z_\mathrm{thres}\,\sigma / \eta\big)`
        with :math:`\eta = z_t / z_\mathrm{thres}`, i.e.
        :math:`\mu + z_\mathrm{thres}^2\sigma / z_t` (times ``clip_factor``
        :math:`c_f`); the larger the spike, the harder the clip;
      - ``clip_option="mean"``: :math:`g^*_t = \mu`;

    * ``mode="percentile"``: a spike is :math:`g_t > \mu + z_\mathrm{thres}\sigma`,
      clipped to :math:`g^*_t = \mu + z_\mathrm{thres}\sigma`.

    The gradients are scaled by :math:`\min(1, g^*_t / (g_t + 10^{-6}))`
    (``clip_grad_norm_``'s formula), ``max_norm`` (if given) caps :math:`g^*_t`
    and applies on every step, and the statistics are updated with the norm
    *after* clipping, :math:`\tilde g_t = g^*_t` on a spike and :math:`g_t`
    otherwise (not at all on a spike with ``skip_update_on_spike``):

    .. math:: \mu \leftarrow \alpha\mu + (1-\alpha)\tilde g_t, \qquad
              \sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(\tilde g_t - \mu)^2

    where the variance uses the *updated* mean, as the reference code does.

    Parameters
    ----------
    alpha : float, default 0.97
        EMA decay, in (0, 1).
    z_thresh : float, default 2.5
        z-score threshold; finite and > 0.
    warmup_steps : int, default 25
        Norms collected before the statistics start.
    mode : {"zscore", "percentile"}
        As above.
    max_norm : float, optional
        Hard cap applied on every step, warm-up included.  The reference's
        default is 1.0 (``max_grad_norm``); here None: no cap unless asked for.
    clip_option : {"adaptive_scaling", "mean"}
        zscore mode's clip target.
    clip_factor : float, default 1.0
        Multiplies the adaptive_scaling target; finite and > 0.
    eps : float, default 1e-6
        In the z-score's denominator and in the clip coefficient's.
    skip_update_on_spike : bool, default False
        Leave the statistics unchanged on spikes.
    nonfinite : {"propagate", "error", "skip"}
        See the module docstring.

    Notes
    -----
    Points where this follows the reference code rather than a formula, or
    where the sources leave room:

    * the reference clips with ``clip_grad_norm_(params, total_norm)`` on
      ordinary steps (a factor ``g/(g + 1e-6)``, a no-op to 1e-6 relative);
      this class leaves such gradients untouched;
    * the statistics are updated with the spike's clip target
      :math:`g^*_t` before the ``max_norm`` cap (the reference's ``clip_val``);
    * the warm-up statistics use the raw norms, never the capped ones.

    References
    ----------
    .. [1] Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
       2025. https://arxiv.org/abs/2504.02507

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.adaptive import ZClip
    >>> clipper = ZClip(warmup_steps=3)
    >>> for norm in (1.0, 1.2, 0.8):  # warm-up: mean 1, variance 0.02667
    ...     _ = clipper([np.array([norm])])
    >>> round(clipper.mean, 6), round(clipper.var, 6)
    (1.0, 0.026667)
    >>> g = [np.array([10.0])]  # z = 55.1 > 2.5: a spike
    >>> float(clipper(g)), round(clipper.last_threshold, 4)
    (10.0, 1.0185)
    >>> np.round(g[0], 4)
    array([1.0185])
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        mode: str = "zscore",
        max_norm: float | None = None,
        *,
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        eps: float = 1e-6,
        skip_update_on_spike: bool = False,
        ord: float = 2,
        nonfinite: str = "propagate",
    ) -> None:
        self.alpha = real_param(alpha, "alpha", gt=0, lt=1)
        self.z_thresh = real_param(z_thresh, "z_thresh", gt=0)
        self.warmup_steps = int_param(warmup_steps, "warmup_steps", 1)
        self.mode = choice_param(mode, "mode", ("zscore", "percentile"))
        self.max_norm = None if max_norm is None else check_max_norm(max_norm)
        self.clip_option = choice_param(clip_option, "clip_option", ("adaptive_scaling", "mean"))
        self.clip_factor = real_param(clip_factor, "clip_factor", gt=0)
        self.eps = check_eps(eps)
        self.skip_update_on_spike = bool_param(skip_update_on_spike, "skip_update_on_spike")
        self.ord = ord_value(ord)
        self._init_common(nonfinite)
        self.mean: float | None = None
        self.var: float | None = None
        self.initialized = False
        self.buffer: list[float] = []

    def _config(self) -> dict[str, Any]:
        return dict(
            alpha=self.alpha,
            z_thresh=self.z_thresh,
            warmup_steps=self.warmup_steps,
            mode=self.mode,
            max_norm=self.max_norm,
            clip_option=self.clip_option,
            clip_factor=self.clip_factor,
            eps=self.eps,
            skip_update_on_spike=self.skip_update_on_spike,
            ord=self.ord,
            nonfinite=self.nonfinite,
        )

    _STATE_KEYS = ("mean", "var", "initialized", "buffer")

    def _state(self) -> dict[str, Any]:
        return dict(
            mean=self.mean, var=self.var, initialized=self.initialized, buffer=list(self.buffer)
        )

    def _load_state(self, sd: dict[str, Any]) -> None:
        initialized = bool_param(sd["initialized"], "initialized")
        mean, var = recorded_statistic(sd["mean"], "mean"), recorded_statistic(sd["var"], "var")
        buffer = recorded_norms(sd["buffer"], "buffer")
        # What a run of `step` counted calls leaves: the warm-up buffer holds one norm
        # per step until it has `warmup_steps`, then becomes the statistics.
        if initialized:
            problem = None
            if mean is None or var is None:
                problem = "initialized without mean and var"
            elif buffer:
                problem = "initialized with a non-empty warm-up buffer"
            elif self.step < self.warmup_steps:
                problem = f"initialized at step {self.step} < warmup_steps {self.warmup_steps}"
        elif mean is not None or var is not None:
            problem = "mean or var set before the warm-up ended"
        elif len(buffer) != self.step or len(buffer) >= self.warmup_steps:
            problem = (
                f"{len(buffer)} warm-up norms at step {self.step} with warmup_steps "
                f"{self.warmup_steps}"
            )
        else:
            problem = None
        if problem is not None:
            raise ValueError(f"ZClip.load_state_dict: an inconsistent state: {problem}")
        self.mean, self.var, self.initialized, self.buffer = mean, var, initialized, buffer

    def _spike_target(self, g: float) -> float | None:
        """The reference's ``_compute_clip_val``: the clip target of a spike, or None."""
        assert self.mean is not None and self.var is not None
        std = self.var**0.5
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            return threshold if g > threshold else None
        z = _ieee_div(g - self.mean, std + self.eps)
        if not z > self.z_thresh:
            return None
        if self.clip_option == "mean":
            return self.mean
        eta = z / self.z_thresh
        return (self.mean + (self.z_thresh * std) / eta) * self.clip_factor

    def _threshold(self, value: float) -> tuple[float | None, Callable[[bool], None]]:
        if not self.initialized:

            def settle_warmup(ok: bool) -> None:
                if not ok:
                    return
                self.buffer.append(value)
                if len(self.buffer) >= self.warmup_steps:
                    n = len(self.buffer)
                    self.mean = mean = sum(self.buffer) / n
                    self.var = sum(_square(x - mean) for x in self.buffer) / n
                    self.initialized = True
                    self.buffer = []

            return self.max_norm, settle_warmup
        target = self._spike_target(value)
        if target is None:
            threshold = self.max_norm
        elif self.max_norm is None:
            threshold = target
        else:
            threshold = min(target, self.max_norm)
        if target is not None and self.skip_update_on_spike:
            return threshold, settle_nothing
        x = value if target is None else target

        def settle(ok: bool) -> None:
            if not ok:
                return
            assert self.mean is not None and self.var is not None
            self.mean = mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * _square(x - mean)

        return threshold, settle
