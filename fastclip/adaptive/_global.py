"""Clippers that scale every gradient by one coefficient of the global norm, and
the plain one, ``GlobalNormClipper``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .. import _api, _dispatch
from .._validate import check_eps, check_max_norm
from ._base import Clipper, check_writable, copies, core_checks_writes, ord_value, settle_nothing

__all__ = ["GlobalNormBased", "GlobalNormClipper"]


class GlobalNormBased(Clipper):
    """Clippers that scale all gradients by one coefficient from the global norm."""

    ord: float
    eps: float

    def _threshold(self, value: float) -> tuple[float | None, Callable[[bool], None]]:
        """The norm to clip this step's gradients to (None: leave them), and ``settle``.

        ``settle(True)`` is called once the gradients are clipped and records
        the step in the statistics; ``settle(False)`` when the clip raised, and
        leaves the statistics as they were before this call.
        """
        raise NotImplementedError

    def _run(
        self, grads: Any, params: Any, inplace: bool, given: Any = None
    ) -> tuple[list[Any], Any]:
        items = _dispatch.as_array_list(grads)
        if not items:
            self._record(0.0, None, False)
            return [], _api.global_norm([])
        check = inplace
        if inplace and not core_checks_writes(items[0]):
            # The generic (Array API) route writes array after array without these
            # checks: a bad second gradient would fail after the first was written.
            check_writable(items, type(self).__name__)
            check = False
        total = _api.global_norm(items, self.ord) if given is None else given
        value = float(total)
        if not math.isfinite(value) and self._nonfinite(value):
            out = self._untouched(items, inplace, check)
            self._record(value, None, True)
            return out, total
        threshold, settle = self._threshold(value)
        try:
            out = self._scaled(items, total, threshold, inplace, check)
        except BaseException:
            settle(False)
            raise
        settle(True)
        self.step += 1
        self._record(value, threshold, False)
        return out, total

    def _untouched(self, items: list[Any], inplace: bool, check: bool) -> list[Any]:
        """The result of a step that scales nothing.

        On NumPy and torch an in-place step that clips has the core refuse
        read-only or overlapping gradients before it writes; one that does not
        clip checks them here (``check``), so such gradients are refused whatever
        the norms, not first at the step that happens to clip.
        """
        if not inplace:
            return copies(items)
        if check:
            check_writable(items, type(self).__name__)
        return items

    def _scaled(
        self, items: list[Any], total: Any, threshold: float | None, inplace: bool, check: bool
    ) -> Any:
        if threshold is None:
            return self._untouched(items, inplace, check)
        # A NaN threshold (propagate) gives a NaN coefficient, as clip_grad_norm_(nan) does.
        c = 0.0 if math.isnan(threshold) else threshold
        given = math.nan if math.isnan(threshold) else total
        if inplace:
            _api.clip_by_global_norm_(items, c, self.ord, eps=self.eps, total_norm=given)
            return items
        return _api.clip_by_global_norm(items, c, self.ord, eps=self.eps, total_norm=given)[0]


class GlobalNormClipper(GlobalNormBased):
    r"""Clip the global norm of all gradients to ``max_norm`` (the plain case).

    .. math:: g_k \leftarrow g_k \cdot \min\Big(1, \frac{c}{\|(g_1,\ldots,g_n)\|_p
              + \varepsilon}\Big)

    exactly ``torch.nn.utils.clip_grad_norm_`` (``eps = 1e-6``) behind the
    clipper interface, so a training loop can switch clippers freely.  Global-norm
    clipping against exploding gradients is from Pascanu, Mikolov and Bengio [1]_.

    Parameters
    ----------
    max_norm : float
        ``c >= 0``.
    ord : float, default 2
        Any ``p > 0`` or ``inf``.
    eps : float, default 1e-6
        Added to the norm in the denominator.
    nonfinite : {"propagate", "error", "skip"}
        See the module docstring.

    References
    ----------
    .. [1] R. Pascanu, T. Mikolov, Y. Bengio, "On the difficulty of training
       Recurrent Neural Networks", ICML 2013. https://arxiv.org/abs/1211.5063

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.adaptive import GlobalNormClipper
    >>> clipper = GlobalNormClipper(1.0, eps=0.0)
    >>> grads = [np.array([3.0], np.float32), np.array([4.0], np.float32)]
    >>> clipper(grads)
    array(5., dtype=float32)
    >>> grads
    [array([0.6], dtype=float32), array([0.8], dtype=float32)]
    """

    def __init__(
        self, max_norm: float, ord: float = 2, *, eps: float = 1e-6, nonfinite: str = "propagate"
    ) -> None:
        self.max_norm = check_max_norm(max_norm)
        self.ord = ord_value(ord)
        self.eps = check_eps(eps)
        self._init_common(nonfinite)

    def _config(self) -> dict[str, Any]:
        return dict(max_norm=self.max_norm, ord=self.ord, eps=self.eps, nonfinite=self.nonfinite)

    def _threshold(self, value: float) -> tuple[float | None, Callable[[bool], None]]:
        return self.max_norm, settle_nothing
