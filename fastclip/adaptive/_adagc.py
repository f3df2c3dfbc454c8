"""AdaGC: per-tensor adaptive clipping against an EMA of each tensor's own norm."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from .. import _api, _dispatch
from .._errors import name_error
from .._validate import check_eps, check_max_norm
from ._base import (
    Clipper,
    check_writable,
    copies,
    int_param,
    ord_value,
    real_param,
    recorded_norms,
)

__all__ = ["AdaGC", "named_errors"]

T = TypeVar("T")


def named_errors(what: str, make: Callable[[], T]) -> T:
    """``make()``, with a TypeError or ValueError prefixed by the public name
    (``"fastclip.adaptive.AdaGC: clip_ratio must be ..."``) by the one rule of
    every public entry point (``fastclip._errors.name_error``)."""
    try:
        return make()
    except (TypeError, ValueError) as e:
        name_error(e, what)
        raise


class AdaGC(Clipper):
    r"""AdaGC: clip each tensor against an EMA of its own gradient norm.

    Wang et al. (2025), "AdaGC: Improving Training Stability for Large Language
    Model Pretraining", arXiv:2502.11034 [1]_; the authors' PyTorch code is the
    ``AdaGC`` class of ``megatron/optimizer/clip_grads.py`` in the patches of
    github.com/lishuai-97/AdaGC (the PaddlePaddle version is Paddle PR 79041).
    With :math:`n_{t,i} = \|g_{t,i}\|_p` the norm of tensor :math:`i` at call
    :math:`t`:

    *Warm-up* (calls :math:`t \le T_w`, ``warmup_steps``): global-norm
    clipping to ``max_norm`` (:math:`g \leftarrow g\,\min(1, c / (\|g\| +
    \epsilon))`, Megatron's ``clip_grad_norm_fp32``), and each tensor's
    reference is the smallest clipped norm seen, :math:`\gamma_i = \min_t
    \tilde n_{t,i}`.

    *Then*, tensor by tensor, with :math:`\lambda` = ``clip_ratio``:

    .. math::

        g_{t,i} \leftarrow g_{t,i} \cdot \frac{\lambda \gamma_{t-1,i}}{n_{t,i} + \epsilon}
        \quad \text{if } n_{t,i} > \lambda \gamma_{t-1,i}, \qquad
        \gamma_{t,i} = \beta \gamma_{t-1,i} + (1 - \beta)\,\min(n_{t,i}, \lambda\gamma_{t-1,i})

    (the EMA follows the *clipped* norm).  A tensor's reference starts from its
    first norm where warm-up did not set it (``warmup_steps=0``).

    Parameters
    ----------
    max_norm : float, default 1.0
        The warm-up's global bound (Megatron's ``--clip-grad`` default).
    clip_ratio : float, default 1.04
        :math:`\lambda \ge 0` (the reference's ``--clip-ratio`` default).
    beta : float, default 0.99
        EMA decay, in [0, 1).
    warmup_steps : int, default 100
        :math:`T_w` (the reference's ``start_clip_steps``).
    eps : float, default 1e-6
        In both coefficients' denominators.
    ord : float, default 2
        Order of the norms.
    nonfinite : {"propagate", "error", "skip"}
        Applied to the global norm (see the module docstring); "propagate"
        is the reference's behaviour: a NaN norm is never clipped and enters
        the tensor's EMA; an infinite one is clipped (coefficient 0).

    Attributes
    ----------
    norm_ema : list of float or None
        :math:`\gamma_i`, one per tensor, None before the first call.
    last_thresholds : list of float or None
        :math:`\lambda\gamma_{t-1,i}` of the last adaptive call (None in warm-up).

    Notes
    -----
    Every call must pass the same number of gradients, in the same order (the
    reference keys its state by parameter).  The clipped norm in warm-up is
    :math:`n_{t,i}` times the global coefficient, where the reference takes
    the norm of the scaled tensor again (equal up to rounding).

    References
    ----------
    .. [1] G. Wang, S. Li, C. Chen, J. Liu et al., "AdaGC: Improving Training
       Stability for Large Language Model Pretraining", 2025.
       https://arxiv.org/abs/2502.11034

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.adaptive import AdaGC
    >>> clipper = AdaGC(max_norm=10.0, warmup_steps=1, clip_ratio=1.0, beta=0.5, eps=0.0)
    >>> g = [np.array([3.0, 4.0]), np.array([1.0])]
    >>> float(clipper(g))  # warm-up: global norm 5.1 < 10, references 5 and 1
    5.0990195135927845
    >>> clipper.norm_ema
    [5.0, 1.0]
    >>> g = [np.array([3.0, 4.0]), np.array([4.0])]  # the second tensor spikes
    >>> _ = clipper(g)
    >>> g[1], clipper.norm_ema  # clipped to 1.0 * 1.0; EMA 0.5 * 1 + 0.5 * 1
    (array([1.]), [5.0, 1.0])
    """

    def __init__(
        self,
        max_norm: float = 1.0,
        clip_ratio: float = 1.04,
        beta: float = 0.99,
        warmup_steps: int = 100,
        *,
        eps: float = 1e-6,
        ord: float = 2,
        nonfinite: str = "propagate",
    ) -> None:
        what = "fastclip.adaptive.AdaGC"
        self.max_norm = named_errors(what, lambda: check_max_norm(max_norm))
        self.clip_ratio = named_errors(what, lambda: real_param(clip_ratio, "clip_ratio", ge=0))
        self.beta = named_errors(what, lambda: real_param(beta, "beta", ge=0, lt=1))
        self.warmup_steps = named_errors(what, lambda: int_param(warmup_steps, "warmup_steps", 0))
        self.eps = named_errors(what, lambda: check_eps(eps))
        self.ord = named_errors(what, lambda: ord_value(ord))
        named_errors(what, lambda: self._init_common(nonfinite))
        self.norm_ema: list[float] | None = None
        self.last_thresholds: list[float] | None = None

    def _config(self) -> dict[str, Any]:
        return dict(
            max_norm=self.max_norm,
            clip_ratio=self.clip_ratio,
            beta=self.beta,
            warmup_steps=self.warmup_steps,
            eps=self.eps,
            ord=self.ord,
            nonfinite=self.nonfinite,
        )

    _STATE_KEYS = ("norm_ema",)

    def _state(self) -> dict[str, Any]:
        return dict(norm_ema=None if self.norm_ema is None else list(self.norm_ema))

    def _load_state(self, sd: dict[str, Any]) -> None:
        what = "fastclip.adaptive.AdaGC.load_state_dict"
        ema = sd["norm_ema"]
        if ema is not None:
            ema = named_errors(what, lambda: recorded_norms(ema, "norm_ema"))
        if (ema is None) != (self.step == 0):
            raise ValueError(
                f"{what}: an inconsistent state: norm_ema is {'unset' if ema is None else 'set'} "
                f"at step {self.step} (every call sets it)"
            )
        self.norm_ema = ema

    def _run(
        self, grads: Any, params: Any, inplace: bool, given: Any = None
    ) -> tuple[list[Any], Any]:
        what = "fastclip.adaptive.AdaGC"
        if params is not None:
            raise TypeError(f"{what}.clip: takes no parameters (AdaGC clips gradients only)")
        if given is not None:  # each tensor is clipped against its own norm's EMA
            raise TypeError(f"{what}.clip: takes no total_norm (AdaGC clips per tensor)")
        items = _dispatch.as_array_list(grads)
        if self.norm_ema is not None and len(items) != len(self.norm_ema):
            raise ValueError(
                f"{what}.clip: {len(items)} gradients, but the state holds {len(self.norm_ema)} "
                "tensors; pass the same gradients, in the same order, on every call"
            )
        if not items:
            self._record(0.0, None, False)
            return [], _api.global_norm([])
        if inplace:
            check_writable(items, what)
        total, per = _api.global_norm(items, self.ord, per_array=True)
        value = float(total)
        norms = [float(n) for n in per.tolist()] if hasattr(per, "tolist") else list(per)
        if not math.isfinite(value) and self._nonfinite(value):
            self._record(value, None, True)
            return (items if inplace else copies(items)), total
        warm = self.step < self.warmup_steps
        coefs, ema, thresholds = (self._warmup if warm else self._adaptive)(value, norms)
        out = items if inplace else copies(items)
        for a, c in zip(out, coefs):
            if c is not None:
                _api.scale_([a], c)
        self.norm_ema, self.last_thresholds = ema, thresholds
        self.step += 1
        self._record(value, self.max_norm if warm else None, False)
        return out, total

    def _warmup(
        self, total: float, norms: list[float]
    ) -> tuple[list[float | None], list[float], None]:
        """Megatron's global clip; each reference becomes the smallest clipped norm."""
        c = self.max_norm / (total + self.eps) if total + self.eps > 0 else math.inf
        clipped = c < 1.0
        after = [n * c for n in norms] if clipped else norms
        old = self.norm_ema if self.norm_ema is not None else [None] * len(norms)
        ema = [n if o is None or n < o else o for n, o in zip(after, old)]
        return [c if clipped else None] * len(norms), ema, None

    def _adaptive(
        self, total: float, norms: list[float]
    ) -> tuple[list[float | None], list[float], list[float]]:
        old = self.norm_ema if self.norm_ema is not None else norms
        coefs: list[float | None] = []
        ema, thresholds = [], []
        for n, g in zip(norms, old):
            t = self.clip_ratio * g
            thresholds.append(t)
            if n > t:
                coefs.append(t / (n + self.eps))
                n = t
            else:
                coefs.append(None)
            ema.append(g * self.beta + n * (1.0 - self.beta))
        return coefs, ema, thresholds
