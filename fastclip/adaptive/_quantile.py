"""Quantile-based adaptive clipping for DP-SGD (Andrew et al. 2021)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .. import _api
from .._api._per_sample import PerSampleClipResult
from .._errors import public_method
from .._validate import check_eps
from ._adagc import named_errors
from ._base import Clipper, bool_param, int_param, real_param

__all__ = ["QuantileClip"]

_WHAT = "fastclip.adaptive.QuantileClip"


def _rng_state(rng: np.random.Generator) -> list[int]:
    s = rng.bit_generator.state
    return [
        int(s["state"]["state"]),
        int(s["state"]["inc"]),
        int(s["has_uint32"]),
        int(s["uinteger"]),
    ]


def _rng_from(values: Any) -> np.random.Generator:
    ok = isinstance(values, (list, tuple)) and len(values) == 4
    ok = ok and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)
    if not ok:
        raise TypeError(f"{_WHAT}.load_state_dict: 'rng' must be a list of 4 ints, got {values!r}")
    rng = np.random.Generator(np.random.PCG64())
    state, inc, has, word = (int(v) for v in values)
    try:
        rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": state, "inc": inc},
            "has_uint32": has,
            "uinteger": word,
        }
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{_WHAT}.load_state_dict: 'rng' is not a PCG64 state: {e}") from None
    return rng


class QuantileClip(Clipper):
    r"""DP-SGD clipping whose bound follows a quantile of the per-sample norms.

    Andrew, Thakkar, McMahan, Ramaswamy (2021), "Differentially Private
    Learning with Adaptive Clipping", arXiv:1905.03871 [1]_, as Opacus'
    ``AdaClipDPOptimizer`` implements it (TensorFlow Privacy's
    ``QuantileAdaptiveClipSumQuery`` is the same estimator).  Each
    :meth:`clip_per_sample` clips the per-sample gradients to the current bound
    :math:`C` with :func:`fastclip.clip_per_sample` (factor
    :math:`\min(1, C/(n_b + \epsilon))`, Opacus' flat clipping), counts the
    unclipped samples (factor 1), and at :meth:`update` (by default at the end
    of every call):

    .. math::

        \tilde b = \frac{\#\{b : n_b + \epsilon \le C\} + \mathcal N(0, \sigma_b^2)}{m},
        \qquad
        C \leftarrow \mathrm{clamp}\big(C\, e^{-\eta (\tilde b - \gamma)},
        C_\min, C_\max\big)

    with :math:`m` the samples counted since the last update, :math:`\gamma`
    ``target_unclipped_quantile``, :math:`\eta` ``clipbound_learning_rate`` and
    :math:`\sigma_b` ``unclipped_num_std`` (the noise on the *count*, as Opacus
    adds it; Theorem 1 of the paper gives the matching gradient noise
    :math:`(\sigma^{-2} - (2\sigma_b)^{-2})^{-1/2}`, see :meth:`noise_multiplier`).

    Parameters
    ----------
    max_norm : float
        The initial bound :math:`C_0 > 0`.
    target_unclipped_quantile : float, default 0.5
        :math:`\gamma \in [0, 1]` (the paper's experiments use 0.5).
    clipbound_learning_rate : float, default 0.2
        :math:`\eta \ge 0` (the paper's 0.2).
    min_clipbound, max_clipbound : float, default 0 and inf
        The clamp (Opacus requires both; here unbounded by default).
    unclipped_num_std : float, default 0.0
        :math:`\sigma_b \ge 0`; 0 is the noise-free, deterministic estimator
        (not private).  The paper suggests :math:`m/20`.
    seed : int, optional
        Seed of the count noise (NumPy's PCG64); its state is in the state dict.
    eps : float, default 1e-6
        In the clip factor's denominator (Opacus').
    nonfinite : {"propagate", "error", "skip"}
        Applied to the per-sample norms: "propagate" clips and counts as
        Opacus does (a NaN sample is counted as unclipped, its factor is NaN),
        "error" raises and "skip" returns the unclipped sum, both without
        counting anything.

    References
    ----------
    .. [1] G. Andrew, O. Thakkar, H. B. McMahan, S. Ramaswamy, "Differentially
       Private Learning with Adaptive Clipping", NeurIPS 2021.
       https://arxiv.org/abs/1905.03871

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.adaptive import QuantileClip
    >>> clip = QuantileClip(max_norm=1.0, clipbound_learning_rate=1.0)
    >>> g = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.1], [6.0, 8.0]])  # norms 5, .5, .1, 10
    >>> out = clip.clip_per_sample(g)  # 2 of 4 unclipped: b = 0.5 = gamma, C stays
    >>> out.n_clipped, clip.max_norm
    (2, 1.0)
    >>> _ = clip.clip_per_sample(g[:3] * 10)  # norms 50, 5, 1: none unclipped
    >>> round(clip.max_norm, 6)  # 1.0 * exp(-1.0 * (0 - 0.5))
    1.648721
    """

    def __init__(
        self,
        max_norm: float,
        target_unclipped_quantile: float = 0.5,
        clipbound_learning_rate: float = 0.2,
        min_clipbound: float = 0.0,
        max_clipbound: float = math.inf,
        unclipped_num_std: float = 0.0,
        *,
        seed: int | None = None,
        eps: float = 1e-6,
        nonfinite: str = "propagate",
    ) -> None:
        w = _WHAT
        self.max_norm = named_errors(w, lambda: real_param(max_norm, "max_norm", gt=0))
        self.target_unclipped_quantile = named_errors(
            w,
            lambda: real_param(target_unclipped_quantile, "target_unclipped_quantile", ge=0, le=1),
        )
        self.clipbound_learning_rate = named_errors(
            w, lambda: real_param(clipbound_learning_rate, "clipbound_learning_rate", ge=0)
        )
        self.min_clipbound = named_errors(
            w, lambda: real_param(min_clipbound, "min_clipbound", ge=0)
        )
        self.max_clipbound = named_errors(
            w, lambda: real_param(max_clipbound, "max_clipbound", gt=0, finite=False)
        )
        if not self.min_clipbound < self.max_clipbound:
            raise ValueError(
                f"{w}: min_clipbound ({min_clipbound!r}) must be below max_clipbound "
                f"({max_clipbound!r})"
            )
        self.unclipped_num_std = named_errors(
            w, lambda: real_param(unclipped_num_std, "unclipped_num_std", ge=0)
        )
        self.seed = None if seed is None else named_errors(w, lambda: int_param(seed, "seed", 0))
        self.eps = named_errors(w, lambda: check_eps(eps))
        self.ord = 2.0
        named_errors(w, lambda: self._init_common(nonfinite))
        self._rng = np.random.default_rng(self.seed)
        self.unclipped_num = 0
        self.sample_size = 0

    def _config(self) -> dict[str, Any]:
        return dict(
            max_norm=self.max_norm,
            target_unclipped_quantile=self.target_unclipped_quantile,
            clipbound_learning_rate=self.clipbound_learning_rate,
            min_clipbound=self.min_clipbound,
            max_clipbound=self.max_clipbound,
            unclipped_num_std=self.unclipped_num_std,
            seed=self.seed,
            eps=self.eps,
            nonfinite=self.nonfinite,
        )

    _STATE_KEYS = ("unclipped_num", "sample_size", "rng")

    def state_dict(self) -> dict[str, Any]:
        """Configuration and state: the current bound is ``max_norm``."""
        sd = self._config()  # no "ord": the L2 norm only (Opacus' flat clipping)
        sd["step"] = self.step
        sd.update(self._state())
        return sd

    def _state(self) -> dict[str, Any]:
        return dict(
            unclipped_num=self.unclipped_num,
            sample_size=self.sample_size,
            rng=_rng_state(self._rng),
        )

    def _load_state(self, sd: dict[str, Any]) -> None:
        w = f"{_WHAT}.load_state_dict"
        unclipped = named_errors(w, lambda: int_param(sd["unclipped_num"], "unclipped_num", 0))
        size = named_errors(w, lambda: int_param(sd["sample_size"], "sample_size", 0))
        if unclipped > size:
            raise ValueError(f"{w}: unclipped_num {unclipped} > sample_size {size}")
        self._rng = _rng_from(sd["rng"])
        self.unclipped_num, self.sample_size = unclipped, size

    def _run(
        self, grads: Any, params: Any, inplace: bool, given: Any = None
    ) -> tuple[list[Any], Any]:
        raise TypeError(
            f"{_WHAT}: clips per-sample gradients; call .clip_per_sample(grads) "
            "(there is no in-place or batch-gradient form)"
        )

    def noise_multiplier(self, sigma: float) -> float:
        r"""The gradient noise multiplier :math:`(\sigma^{-2} - (2\sigma_b)^{-2})^{-1/2}`
        that, with this count noise, spends the privacy of noise ``sigma`` alone
        (Theorem 1 of the paper; Opacus' ``add_noise``).  Needs :math:`\sigma < 2\sigma_b`."""
        s = real_param(sigma, "sigma", ge=0)
        if s == 0:
            return 0.0
        if not s < 2 * self.unclipped_num_std:
            raise ValueError(
                f"{_WHAT}.noise_multiplier: sigma ({s}) must be < 2 * unclipped_num_std "
                f"({2 * self.unclipped_num_std}) (Theorem 1 of arXiv:1905.03871)"
            )
        return float((s**-2 - (2 * self.unclipped_num_std) ** -2) ** -0.5)

    @public_method("clip_per_sample", "grads")
    def clip_per_sample(
        self, grads: Any, *, reduce: str | None = "sum", update: bool = True
    ) -> PerSampleClipResult:
        """:func:`fastclip.clip_per_sample` at the current bound; count; update.

        ``update=False`` only counts (gradient accumulation: several calls per
        optimizer step, then :meth:`update`, as Opacus counts every
        micro-batch until its ``pre_step``).  A call that raises counts nothing.
        """
        w = f"{_WHAT}.clip_per_sample"
        update = named_errors(w, lambda: bool_param(update, "update"))
        result = named_errors(
            w,
            lambda: _api.clip_per_sample(grads, self.max_norm, 2, reduce=reduce, eps=self.eps),
        )
        norms = np.asarray(_host(result.norms), np.float64)
        batch = int(norms.shape[-1])
        total = float(np.sqrt(np.sum(norms * norms)))
        if not math.isfinite(total) and self._nonfinite(total):
            # skip: the gradients' own (unclipped) reduction, nothing counted
            self._record(total, None, True)
            return PerSampleClipResult(_plain(grads, reduce), result.norms, 0)
        self.unclipped_num += batch - result.n_clipped
        self.sample_size += batch
        self._record(total, self.max_norm, False)
        if update:
            self.update()
        return result

    def update(self) -> float:
        """Move the bound with the counts since the last update; return the new bound.

        Nothing counted (``sample_size`` 0): no change.
        """
        if self.sample_size == 0:
            return self.max_norm
        noise = 0.0
        if self.unclipped_num_std > 0:
            noise = float(self._rng.normal(0.0, self.unclipped_num_std))
        frac = (self.unclipped_num + noise) / self.sample_size
        c = self.max_norm * math.exp(
            -self.clipbound_learning_rate * (frac - self.target_unclipped_quantile)
        )
        self.max_norm = min(max(c, self.min_clipbound), self.max_clipbound)
        self.unclipped_num = self.sample_size = 0
        self.step += 1
        return self.max_norm


def _plain(grads: Any, reduce: str | None) -> Any:
    """The per-sample gradients reduced without clipping (what "skip" returns)."""
    import array_api_compat as aac

    single = not isinstance(grads, (list, tuple))
    items = [grads] if single else list(grads)
    xp = aac.array_namespace(*items)
    if reduce is None:
        out = [xp.asarray(g, copy=True) for g in items]
    elif reduce == "sum":
        out = [xp.sum(g, axis=0) for g in items]
    else:
        out = [xp.sum(g, axis=0) / g.shape[0] for g in items]
    return out[0] if single else out


def _host(a: Any) -> Any:
    """A NumPy view of per-sample norms from any library (one device copy)."""
    if isinstance(a, np.ndarray):
        return a
    import array_api_compat as aac

    if aac.is_torch_array(a):
        return a.detach().cpu().numpy()
    if aac.is_cupy_array(a):
        return a.get()
    return np.from_dlpack(a)
