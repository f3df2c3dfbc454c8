"""Stable-SPAM's gradient transform (AdaClip, then AdaGN) as a clipper for any optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from .. import _api, _dispatch
from ._adagc import named_errors
from ._base import Clipper, check_writable, copies, int_param, real_param, recorded_norms

__all__ = ["StableSPAMClip", "stable_spam_scale"]

T = TypeVar("T")


def stable_spam_scale(step: int, total_t: int | None, eta_min: float) -> float:
    r"""Stable-SPAM's cosine ``scale`` at step ``step`` (1-based): the reference's
    ``CosineAnnealingLR(T_max=total_t + 1, eta_min)`` from 1.0, in closed form,
    :math:`\eta_\min + (1-\eta_\min)(1 + \cos(\pi t / (T + 1)))/2`; 1 without ``total_t``."""
    if total_t is None:
        return 1.0
    return eta_min + (1.0 - eta_min) * (1 + math.cos(math.pi * step / (total_t + 1))) / 2


class StableSPAMClip(Clipper):
    r"""Stable-SPAM's AdaClip and AdaGN, per tensor, in front of any optimizer.

    Huang et al. (2025), "Stable-SPAM: How to Train in 4-Bit More Stably than
    16-Bit Adam", arXiv:2502.17055 [1]_, the gradient half of the reference
    optimizer ``galore_torch/stablespam.py`` (github.com/TianjinYellow/StableSPAM);
    :class:`fastclip.torch.StableSPAMAdamW` is the whole optimizer, fused.  At
    call :math:`t` (1-based), each gradient :math:`g_i` at its count
    :math:`k_i`, with :math:`s` = :func:`stable_spam_scale` (:math:`t`,
    ``total_t``, ``eta_min``):

    1. *AdaClip*: :math:`M_i \leftarrow \theta M_i + (1-\theta)\max|g_i|`,
       :math:`\hat M_i = M_i / (1-\theta^{k_i})`; the entries with
       :math:`|g| > \hat M_i` are multiplied by :math:`\hat M_i / \max|g_i|`;
    2. *AdaGN*, with :math:`n_i = \|g_i\|_2` after step 1:
       :math:`a_i \leftarrow \gamma_1 s\,a_i + (1-\gamma_1 s)\,n_i`,
       :math:`b_i \leftarrow \gamma_2 b_i + (1-\gamma_2)\,n_i^2`, and if
       :math:`n_i > 0`, :math:`g_i \leftarrow \frac{g_i}{n_i}\cdot
       \frac{a_i/(1-(\gamma_1 s)^{k_i})}{\sqrt{b_i/(1-\gamma_2^{k_i})}+\epsilon}`;
    3. if ``update_proj_gap`` divides :math:`t`, every :math:`k_i` restarts
       at 1 (the reference resets its moments then: reset your optimizer's
       moments on the same steps to follow it).

    Parameters
    ----------
    gamma1 : float, default 0.7
        AdaGN's first-moment decay :math:`\gamma_1`, in [0, 1).
    gamma2 : float, default 0.9
        AdaGN's second-moment decay :math:`\gamma_2`, in [0, 1).
    gamma3 : float, default 0.999
        AdaClip's decay :math:`\theta`, in [0, 1).
    eps : float, default 1e-8
        AdaGN's :math:`\epsilon` (the reference uses its Adam ``eps``).
    total_t : int, optional
        Total steps of the cosine ``scale`` (None: :math:`s = 1`).
    eta_min : float, default 0.5
        The scale's floor.
    update_proj_gap : int, default 1000
        The reset interval; 0: never.
    nonfinite : {"propagate", "error", "skip"}, default "propagate"
        Applied to the total 2-norm before clipping (see
        :mod:`fastclip.adaptive`); "propagate" is the reference's behaviour.

    Attributes
    ----------
    max_ema, norm_m, norm_v : list of float or None
        :math:`M_i`, :math:`a_i`, :math:`b_i`; None before the first call.
    counts : list of int or None
        :math:`k_i`.
    last_clipped : int or None
        How many entries AdaClip scaled in the last call.

    Notes
    -----
    The statistics are float64 host numbers; the scaling runs in the
    gradients' dtype (``fastclip.scale_``).  Every call must pass the same
    number of gradients, in the same order (the reference keys its state by
    parameter).  A call reads each gradient for max|g| and its 2-norm, then
    writes the AdaGN scaling; when AdaClip scales some entries it writes them
    and reads the 2-norm again first.

    References
    ----------
    .. [1] T. Huang, H. Hu, Z. Zhang, G. Jin, X. Li, L. Shen, T. Chen, L. Liu,
       Q. Wen, Z. Wang, S. Liu, "Stable-SPAM: How to Train in 4-Bit More Stably
       than 16-Bit Adam", 2025. https://arxiv.org/abs/2502.17055

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.adaptive import StableSPAMClip
    >>> clipper = StableSPAMClip()
    >>> g = [np.array([3.0, 4.0])]
    >>> float(clipper(g))  # the norm before clipping
    5.0
    >>> g[0]  # step 1: AdaClip's bound is max|g| itself; AdaGN scales to norm ~1
    array([0.6, 0.8])
    >>> g = [np.array([300.0, 4.0])]  # a spike above the bound M / (1 - 0.999**2) = 152.1
    >>> _ = clipper(g)
    >>> clipper.last_clipped, round(clipper.max_ema[0], 6)  # M = 0.999 * 0.004 + 0.001 * 300
    (1, 0.303996)
    """

    _STATE_KEYS = ("max_ema", "norm_m", "norm_v", "counts")

    def __init__(
        self,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        *,
        eps: float = 1e-8,
        total_t: int | None = None,
        eta_min: float = 0.5,
        update_proj_gap: int = 1000,
        nonfinite: str = "propagate",
    ) -> None:
        what = "fastclip.adaptive.StableSPAMClip"
        self.gamma1 = named_errors(what, lambda: real_param(gamma1, "gamma1", ge=0, lt=1))
        self.gamma2 = named_errors(what, lambda: real_param(gamma2, "gamma2", ge=0, lt=1))
        self.gamma3 = named_errors(what, lambda: real_param(gamma3, "gamma3", ge=0, lt=1))
        self.eps = named_errors(what, lambda: real_param(eps, "eps", ge=0))
        self.total_t = None if total_t is None else named_errors(
            what, lambda: int_param(total_t, "total_t", 0)
        )  # fmt: skip
        self.eta_min = named_errors(what, lambda: real_param(eta_min, "eta_min"))
        self.update_proj_gap = named_errors(
            what, lambda: int_param(update_proj_gap, "update_proj_gap", 0)
        )
        named_errors(what, lambda: self._init_common(nonfinite))
        self.max_ema: list[float] | None = None
        self.norm_m: list[float] | None = None
        self.norm_v: list[float] | None = None
        self.counts: list[int] | None = None
        self.last_clipped: int | None = None

    def _config(self) -> dict[str, Any]:
        return dict(
            gamma1=self.gamma1,
            gamma2=self.gamma2,
            gamma3=self.gamma3,
            eps=self.eps,
            total_t=self.total_t,
            eta_min=self.eta_min,
            update_proj_gap=self.update_proj_gap,
            nonfinite=self.nonfinite,
        )

    def state_dict(self) -> dict[str, Any]:
        """Configuration and state as plain numbers, strings and lists (JSON-able)."""
        return {**self._config(), "step": self.step, **self._state()}

    def _state(self) -> dict[str, Any]:
        lists = (self.max_ema, self.norm_m, self.norm_v, self.counts)
        return {k: None if v is None else list(v) for k, v in zip(self._STATE_KEYS, lists)}

    def _load_state(self, sd: dict[str, Any]) -> None:
        what = "fastclip.adaptive.StableSPAMClip.load_state_dict"
        values = [sd[k] for k in self._STATE_KEYS]
        if any(v is None for v in values) != (self.step == 0) or (
            any(v is None for v in values) and not all(v is None for v in values)
        ):
            raise ValueError(
                f"{what}: an inconsistent state: {', '.join(self._STATE_KEYS)} must all be set "
                f"after the first call and all be None before it (step {self.step})"
            )
        if values[0] is None:
            return
        stats: list[list[float]] = []
        for key, value in zip(self._STATE_KEYS[:3], values[:3]):
            stats.append(named_errors(what, _bind(recorded_norms, value, key)))
        counts_in = values[3]
        if not isinstance(counts_in, (list, tuple)):
            raise TypeError(f"{what}: counts must be a list of ints, got {counts_in!r}")
        counts: list[int] = [
            named_errors(what, _bind(int_param, c, "counts", 1)) for c in counts_in
        ]
        if len({len(counts), *(len(v) for v in stats)}) != 1:
            raise ValueError(f"{what}: max_ema, norm_m, norm_v and counts differ in length")
        self.max_ema, self.norm_m, self.norm_v = stats
        self.counts = counts

    def _run(
        self, grads: Any, params: Any, inplace: bool, given: Any = None
    ) -> tuple[list[Any], Any]:
        what = "fastclip.adaptive.StableSPAMClip"
        if params is not None:
            raise TypeError(f"{what}.clip: takes no parameters (Stable-SPAM clips gradients only)")
        if given is not None:
            raise TypeError(f"{what}.clip: takes no total_norm (Stable-SPAM clips per tensor)")
        items = _dispatch.as_array_list(grads)
        if self.counts is not None and len(items) != len(self.counts):
            raise ValueError(
                f"{what}.clip: {len(items)} gradients, but the state holds {len(self.counts)} "
                "tensors; pass the same gradients, in the same order, on every call"
            )
        if not items:
            self._record(0.0, None, False)
            return [], _api.global_norm([])
        if inplace:
            check_writable(items, what)
        total, norms = _api.global_norm(items, 2, per_array=True)
        value = float(total)
        if not math.isfinite(value) and self._nonfinite(value):
            self._record(value, None, True)
            return (items if inplace else copies(items)), total
        maxes = _floats(_api.global_norm(items, math.inf, per_array=True)[1])
        out = items if inplace else copies(items)
        state = self._advance(out, maxes, _floats(norms))
        self.max_ema, self.norm_m, self.norm_v, self.counts, self.last_clipped = state
        self.step += 1
        self._record(value, None, False)
        return out, total

    def _advance(self, out: list[Any], maxes: list[float], norms: list[float]) -> tuple[Any, ...]:
        """Clip ``out`` in place (nothing can fail by now); the new state."""
        n = len(out)
        t = self.step + 1
        s = stable_spam_scale(t, self.total_t, self.eta_min)
        theta, g1s, g2 = self.gamma3, self.gamma1 * s, self.gamma2
        old_max = self.max_ema or [0.0] * n
        old_m, old_v = self.norm_m or [0.0] * n, self.norm_v or [0.0] * n
        counts = [k + 1 for k in self.counts] if self.counts is not None else [1] * n
        max_ema = [theta * m + (1 - theta) * g for m, g in zip(old_max, maxes)]
        clipped_entries = 0
        spiked = []
        for i, (a, g_max, k) in enumerate(zip(out, maxes, counts)):
            hat = max_ema[i] / (1 - theta**k)
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                count = _clip_above(a, hat, g_max)
            if count:
                clipped_entries += count
                spiked.append(i)
        if spiked:  # AdaGN takes the norm after AdaClip
            again = _floats(_api.global_norm([out[i] for i in spiked], 2, per_array=True)[1])
            for i, v in zip(spiked, again):
                norms[i] = v
        norm_m = [g1s * m + (1 - g1s) * v for m, v in zip(old_m, norms)]
        norm_v = [g2 * b + (1 - g2) * v * v for b, v in zip(old_v, norms)]
        for a, v, m, b, k in zip(out, norms, norm_m, norm_v, counts):
            if v > 0:  # the reference's `if norm > 0`: a NaN norm leaves g as it is
                c = (m / (1 - g1s**k)) / (math.sqrt(b / (1 - g2**k)) + self.eps)
                _api.scale_([a], c / v)
        gap = self.update_proj_gap
        if gap != 0 and t % gap == 0:
            counts = [1] * n
        return max_ema, norm_m, norm_v, counts, clipped_entries


def _bind(func: Callable[..., T], *args: Any) -> Callable[[], T]:
    return lambda: func(*args)


def _floats(values: Any) -> list[float]:
    return [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def _clip_above(a: Any, hat: float, g_max: float) -> int:
    """AdaClip's masked scaling of one gradient, in place: entries with |g| > hat are
    multiplied by hat / max|g|; returns how many."""
    import array_api_compat as aac

    if not hat < g_max:  # no entry above the bound (or NaN: the reference's mask is empty)
        return 0
    xp = aac.array_namespace(a)
    mask = xp.abs(a) > hat
    count = int(xp.sum(xp.astype(mask, xp.int64)))
    if count:
        new = xp.where(mask, a * (hat / g_max), a)
        if aac.is_torch_array(a):
            a.detach().copy_(new)
        else:
            a[...] = new
    return count
