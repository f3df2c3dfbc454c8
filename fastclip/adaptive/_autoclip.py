"""AutoClip and its exact running percentile (two heaps)."""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from .._validate import check_eps
from ._base import int_param, ord_value, real_param, recorded_norms
from ._global import GlobalNormBased

__all__ = ["AutoClip"]


def _lerp(a: float, b: float, t: float) -> float:
    """NumPy's ``_lerp`` (``numpy/lib/_function_base_impl.py``) on Python floats, bit for bit."""
    diff = b - a
    if t >= 0.5:
        return b - diff * (1 - t)
    return a + diff * t


class _Percentile:
    """Exact ``np.percentile(values, 100*q)`` (method "linear") of a changing multiset.

    Two heaps split the sorted values at the interpolation rank: ``lo`` (a
    max-heap of the smallest ``k + 1``) and ``hi`` (a min-heap of the rest), so
    the two order statistics numpy interpolates between are the two tops.
    Insertions and deletions (for a window) cost O(log n); deleted entries are
    removed lazily and the heaps are compacted when half of them are dead.
    NaN values are counted, not stored: numpy returns NaN while any is present.
    """

    def __init__(self, q: float):
        self.q = q
        self.lo: list[tuple[float, int]] = []  # (-value, id)
        self.hi: list[tuple[float, int]] = []  # (value, id)
        self.where: dict[int, int] = {}  # id -> 0 (lo), 1 (hi), 2 (NaN)
        self.n_lo = 0
        self.n_hi = 0
        self.nans = 0
        self.dead: set[int] = set()

    def add(self, value: float, key: int) -> None:
        if value != value:
            self.nans += 1
            self.where[key] = 2
            return
        self._prune()
        if self.n_lo and value <= -self.lo[0][0]:
            heapq.heappush(self.lo, (-value, key))
            self.where[key] = 0
            self.n_lo += 1
        else:
            heapq.heappush(self.hi, (value, key))
            self.where[key] = 1
            self.n_hi += 1

    def remove(self, key: int) -> None:
        side = self.where.pop(key)
        if side == 2:
            self.nans -= 1
            return
        self.dead.add(key)
        if side == 0:
            self.n_lo -= 1
        else:
            self.n_hi -= 1
        if len(self.dead) > 32 and 2 * len(self.dead) > len(self.lo) + len(self.hi):
            self._compact()

    def _compact(self) -> None:
        self.lo = [e for e in self.lo if e[1] not in self.dead]
        self.hi = [e for e in self.hi if e[1] not in self.dead]
        heapq.heapify(self.lo)
        heapq.heapify(self.hi)
        self.dead.clear()

    def _prune(self) -> None:
        dead = self.dead
        while self.lo and self.lo[0][1] in dead:
            dead.discard(heapq.heappop(self.lo)[1])
        while self.hi and self.hi[0][1] in dead:
            dead.discard(heapq.heappop(self.hi)[1])

    def _balance(self, size_lo: int) -> None:
        while self.n_lo > size_lo:
            self._prune()
            v, key = heapq.heappop(self.lo)
            heapq.heappush(self.hi, (-v, key))
            self.where[key] = 1
            self.n_lo -= 1
            self.n_hi += 1
        while self.n_lo < size_lo:
            self._prune()
            v, key = heapq.heappop(self.hi)
            heapq.heappush(self.lo, (-v, key))
            self.where[key] = 0
            self.n_lo += 1
            self.n_hi -= 1
        self._prune()

    def value(self) -> float:
        """numpy's linear-method percentile of the current values (NaN if empty or any NaN)."""
        n = self.n_lo + self.n_hi
        if self.nans or n == 0:
            return math.nan
        vi = (n - 1) * self.q
        if vi >= n - 1:  # numpy: both neighbours are the last value, gamma = vi + 1
            self._balance(n)
            top = -self.lo[0][0]
            return _lerp(top, top, vi + 1)
        k = math.floor(vi)
        self._balance(k + 1)
        return _lerp(-self.lo[0][0], self.hi[0][0], vi - k)


class AutoClip(GlobalNormBased):
    r"""AutoClip: clip to the ``percentile``-th percentile of all gradient norms so far.

    Seetharaman, Wichern, Pardo, Le Roux (2020), "AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks", arXiv:2007.14469 [1]_.  At step
    :math:`t` with global norm :math:`\|g_t\|` the reference code does

    .. code-block:: python

        grad_history.append(obs_grad_norm)
        clip_value = np.percentile(grad_history, clip_percentile)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_value)

    i.e. :math:`\eta_t = P_p(\{\|g_1\|, \ldots, \|g_t\|\})` (the history includes
    the current norm; NumPy's default linear interpolation between order
    statistics) and :math:`g \leftarrow g\,\min(1, \eta_t / (\|g_t\| + 10^{-6}))`.

    The reference sorts the whole history every step (O(t)); here two heaps
    keep the two order statistics around the moving rank, so a step costs
    O(log t) and gives *bit for bit* ``np.percentile``'s value (NaN and inf
    included).  With ``history=N`` only the last N norms count (an exact
    sliding-window percentile, O(log N) per step).

    Parameters
    ----------
    percentile : float, default 10
        ``p`` in [0, 100] (the paper's recommended 10).
    history : int, optional
        Window length; ``None`` keeps every norm (the paper's definition).
    ord : float, default 2
        Order of the global norm.
    eps : float, default 1e-6
        Added to the norm in the coefficient's denominator (torch's).
    nonfinite : {"propagate", "error", "skip"}
        See the module docstring ("propagate" stores NaN in the history, so
        every later percentile is NaN, as in the reference).

    Notes
    -----
    Memory is O(t) (O(N) with a window): the exact percentile of all past
    norms needs them all.  ``state_dict()["norms"]`` lists them in arrival order.

    References
    ----------
    .. [1] P. Seetharaman, G. Wichern, B. Pardo, J. Le Roux, "AutoClip: Adaptive
       Gradient Clipping for Source Separation Networks", IEEE MLSP 2020.
       https://arxiv.org/abs/2007.14469

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.adaptive import AutoClip
    >>> clipper = AutoClip(percentile=50)
    >>> g = [np.array([3.0, 4.0])]
    >>> float(clipper(g)), clipper.last_threshold  # history [5]: median 5, no clip
    (5.0, 5.0)
    >>> g = [np.array([30.0, 40.0])]
    >>> float(clipper(g)), clipper.last_threshold  # history [5, 50]: median 27.5
    (50.0, 27.5)
    >>> np.round(g[0], 4)
    array([16.5, 22. ])
    """

    def __init__(
        self,
        percentile: float = 10,
        history: int | None = None,
        ord: float = 2,
        *,
        eps: float = 1e-6,
        nonfinite: str = "propagate",
    ) -> None:
        percentile_v = real_param(percentile, "percentile", ge=0, le=100)
        self.history = None if history is None else int_param(history, "history", 1)
        self.percentile = percentile_v
        self.ord = ord_value(ord)
        self.eps = check_eps(eps)
        self._init_common(nonfinite)
        self._reset()

    def _reset(self) -> None:
        self._stats = _Percentile(self.percentile / 100)
        self._norms: deque[tuple[int, float]] = deque()
        self._next_key = 0

    def _config(self) -> dict[str, Any]:
        return dict(
            percentile=self.percentile,
            history=self.history,
            ord=self.ord,
            eps=self.eps,
            nonfinite=self.nonfinite,
        )

    def _push(self, value: float) -> tuple[int, float] | None:
        """Record a norm; the (key, norm) the window dropped for it, if any."""
        key = self._next_key
        self._next_key += 1
        self._norms.append((key, value))
        self._stats.add(value, key)
        if self.history is not None and len(self._norms) > self.history:
            dropped = self._norms.popleft()
            self._stats.remove(dropped[0])
            return dropped
        return None

    def _threshold(self, value: float) -> tuple[float | None, Callable[[bool], None]]:
        # The percentile includes this step's norm, so it goes in now and back out
        # if the clip raises.
        dropped = self._push(value)

        def settle(ok: bool) -> None:
            if ok:
                return
            self._stats.remove(self._norms.pop()[0])
            if dropped is not None:
                # A fresh key: the dropped one is marked dead in the heaps.
                key = self._next_key
                self._next_key += 1
                self._norms.appendleft((key, dropped[1]))
                self._stats.add(dropped[1], key)

        return self._stats.value(), settle

    def percentile_value(self) -> float:
        """The current clip value: the percentile of the stored norms (NaN if none)."""
        return self._stats.value()

    _STATE_KEYS = ("norms",)

    def _state(self) -> dict[str, Any]:
        return {"norms": [v for _, v in self._norms]}

    def _load_state(self, sd: dict[str, Any]) -> None:
        norms = recorded_norms(sd["norms"], "norms")
        # Every counted step recorded one norm; a window keeps the last `history`.
        kept = self.step if self.history is None else min(self.step, self.history)
        if len(norms) != kept:
            raise ValueError(
                f"AutoClip.load_state_dict: {len(norms)} norms for step {self.step} and "
                f"history {self.history} (expected {kept}): an inconsistent state"
            )
        self._reset()
        for v in norms:
            self._push(v)
