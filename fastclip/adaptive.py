r"""Stateful gradient clippers: plain global norm, AutoClip, ZClip and AGC.

Every clipper is a small object that you call once per training step on the
list of gradients (and, for AGC, the parameters):

* ``clipper(grads, params=None) -> total_norm`` clips in place and returns the
  global 2-norm of the gradients *before* clipping (a 0-d array of the
  gradients' library, as :func:`fastclip.global_norm`);
* ``clipper.clip(grads, params=None) -> (new_grads, total_norm)`` is the
  out-of-place twin (same state update, new arrays);
* ``state_dict()`` / ``load_state_dict()`` hold plain Python numbers, strings
  and lists only, so a clipper checkpoints with pickle, ``torch.save`` and JSON.

They work on NumPy arrays and torch CPU tensors through the Numba kernels and on
any other Array API array through the core's generic route.  The global-norm
clippers read the gradients once for the norm and, only when they clip, once
more to scale them (the core's multi-tensor kernels: one launch per dtype).

Non-finite norms (``nonfinite=``):

``"propagate"`` (default)
    What the reference implementations do: the norm is used as it is.  A
    clipping step multiplies by a NaN coefficient (NaN gradients), and the
    statistics of AutoClip and ZClip take the value in (a NaN then stays in
    AutoClip's history, and in ZClip's mean, for good).
``"error"``
    Raise :class:`fastclip.NonFiniteNormError` before anything is written or
    any state changes.
``"skip"``
    Leave the gradients untouched and the state unchanged; the call returns
    the non-finite norm and sets ``last_step_skipped = True`` (use it to skip
    the optimizer step, as ``fastclip.torch.ClippedOptimizer`` does).

After each call, ``last_total_norm`` (float), ``last_threshold`` (the norm the
gradients were clipped to, or None) and ``last_step_skipped`` describe it.

A call that raises (a read-only gradient, two gradients sharing memory, a
shape mismatch, ``nonfinite="error"``) writes no gradient and leaves the
clipper as it was: statistics, ``step`` and the ``last_*`` attributes.
"""

from __future__ import annotations

import heapq
import inspect
import math
import numbers
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import _api, _dispatch
from ._memory import shared_pair
from ._validate import NonFiniteNormError, check_eps, check_max_norm, check_ord, scalar_value

__all__ = ["AGC", "AutoClip", "GlobalNormClipper", "ZClip"]

_POLICIES = ("propagate", "error", "skip")


# ------------------------------------------------------------ argument checks


def _check_policy(policy: Any) -> str:
    if not isinstance(policy, str):
        raise TypeError(f"nonfinite must be one of {_POLICIES}, got {policy!r}")
    if policy not in _POLICIES:
        raise ValueError(f"nonfinite must be one of {_POLICIES}, got {policy!r}")
    return policy


def _real(
    value: Any,
    name: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    finite: bool = True,
) -> float:
    """A real hyperparameter as a float: TypeError unless a real number (or 0-d real
    array), ValueError if NaN, infinite (with ``finite``) or outside the bounds."""
    v = scalar_value(value, name)
    bounds = [f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else ""]
    bounds += [f"< {lt:g}" if lt is not None else "", f"<= {le:g}" if le is not None else ""]
    ok = not math.isnan(v) and not (finite and math.isinf(v))
    ok = ok and (gt is None or v > gt) and (ge is None or v >= ge)
    ok = ok and (lt is None or v < lt) and (le is None or v <= le)
    if not ok:
        what = " and ".join(b for b in bounds if b)
        kind = "a finite real number" if finite else "a real number, not NaN,"
        raise ValueError(f"{name} must be {kind}{' ' + what if what else ''}, got {value!r}")
    return v


def _int(value: Any, name: str, minimum: int) -> int:
    """An integer hyperparameter (bool and float refused with a TypeError)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _flag(value: Any, name: str) -> bool:
    """A bool: any other object (``"False"`` is truthy) is a TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _choice(value: Any, name: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {options}, got {value!r}")
    if value.lower() not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value.lower()


def _norm_list(values: Any, name: str) -> list[float]:
    """A list of recorded norms from a state dict: real numbers >= 0, NaN or +inf (what
    a norm can be), as a list or tuple (a string is not a list of digits)."""
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of norms, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must hold real numbers, got {v!r}")
        f = scalar_value(v, name)  # an int beyond float64's range: a ValueError
        if f < 0:
            raise ValueError(f"{name} holds norms, which are >= 0 (or NaN), got {v!r}")
        out.append(f)
    return out


def _state_real(value: Any, name: str) -> float | None:
    """A statistic from a state dict: None, or a real number >= 0 (NaN and +inf
    included: the "propagate" policy lets non-finite norms into the statistics)."""
    if value is None:
        return None
    return _norm_list([value], name)[0]


def _ord_value(ord: Any) -> float:
    return check_ord(ord)[1]


def _json_ord(p: float) -> Any:
    return "inf" if math.isinf(p) else p


def _copies(items: list[Any]) -> list[Any]:
    import array_api_compat as aac

    xp = aac.array_namespace(items[0])
    return [xp.asarray(a, copy=True) for a in items]


# --------------------------------------------------------- in-place targets


def _layout(a: Any) -> tuple[tuple[int, ...], tuple[int, ...], int, int, Any] | None:
    """(shape, strides, first byte, end byte, exact view) of an array's memory.

    The view is a NumPy array on the same memory when one can be had (then
    ``np.shares_memory`` decides overlaps of strided arrays exactly), None when
    the byte range stands for the array (contiguous, or device memory).  None
    overall when the memory cannot be seen (the write then checks for itself).
    """
    import array_api_compat as aac

    if isinstance(a, np.ndarray):
        view = a
    elif aac.is_torch_array(a):
        import torch

        t = a.detach()
        if t.layout is not torch.strided:
            return None  # not strided memory: the write refuses it for itself
        if t.is_contiguous():  # the common case, without a NumPy view (~2 us a tensor)
            lo = t.data_ptr()
            return tuple(t.shape), tuple(t.stride()), lo, lo + t.numel() * t.element_size(), None
        if not t.is_cpu or t.is_conj() or t.is_neg():
            # Device memory (or a lazily negated view): the byte range from the strides.
            item, lo, hi = t.element_size(), t.data_ptr(), t.data_ptr() + t.element_size()
            for n, s in zip(t.shape, t.stride()):
                lo, hi = lo + min(0, (n - 1) * s * item), hi + max(0, (n - 1) * s * item)
            return tuple(t.shape), tuple(t.stride()), lo, hi, None
        from ._cpu import TorchLib

        view = TorchLib.storage(t)
    else:
        try:  # array-api-strict and other CPU libraries that export DLPack
            view = np.from_dlpack(a)
        except Exception:
            return None
    lo, hi = np.lib.array_utils.byte_bounds(view)
    return view.shape, view.strides, lo, hi, None if view.flags.c_contiguous else view


def _core_checks_writes(a: Any) -> bool:
    """Whether the core's in-place clip of such arrays (the Numba and GPU routes)
    refuses read-only, stride-0 and overlapping arrays before its first write."""
    import array_api_compat as aac

    return isinstance(a, np.ndarray) or aac.is_torch_array(a)


def _check_writable(items: list[Any], what: str) -> None:
    """Refuse, before anything is written, gradients that cannot all be scaled in place.

    Read-only arrays, arrays whose elements share memory (stride 0) and two
    gradients sharing memory (scaled twice) would otherwise fail, or give a
    wrong answer, part-way through a call that has already written others.
    """
    import array_api_compat as aac

    if aac.is_jax_array(items[0]):
        raise TypeError(f"{what}: JAX arrays are immutable; use the out-of-place .clip()")
    starts, ends, views, index = [], [], [], []
    for i, a in enumerate(items):
        if not aac.is_writeable_array(a):
            raise ValueError(
                f"{what}: gradient {i} is read-only, so it cannot be clipped in place; "
                f"use the out-of-place {what}.clip()"
            )
        layout = _layout(a)
        if layout is None or math.prod(layout[0]) == 0:
            continue
        shape, strides, lo, hi, view = layout
        if any(n > 1 and s == 0 for n, s in zip(shape, strides)):
            raise ValueError(
                f"{what}: gradient {i} has elements sharing memory (stride 0, as from expand "
                f"or broadcast_to), which cannot be scaled in place; use {what}.clip()"
            )
        starts.append(lo)
        ends.append(hi)
        views.append(view)
        index.append(i)
    if len(starts) > 1:
        pair = shared_pair(np.array(starts, np.int64), np.array(ends, np.int64), views)
        if pair is not None:
            raise ValueError(
                f"{what}: gradients {index[pair[0]]} and {index[pair[1]]} share memory; "
                "they would be scaled twice. Pass each piece of memory once."
            )


def _noop(ok: bool) -> None:
    pass


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


class _Clipper:
    """Shared bookkeeping: policy, step counter, last-call attributes."""

    nonfinite: str
    step: int
    last_total_norm: float | None
    last_threshold: float | None
    last_step_skipped: bool

    def _init_common(self, nonfinite: str) -> None:
        self.nonfinite = _check_policy(nonfinite)
        self.step = 0
        self.last_total_norm = None
        self.last_threshold = None
        self.last_step_skipped = False

    def _nonfinite(self, value: float) -> bool:
        """Apply the policy to a non-finite norm: True = skip this step."""
        if self.nonfinite == "error":
            raise NonFiniteNormError(
                f"{type(self).__name__}: the gradient norm is non-finite ({value}); "
                "nothing was clipped and the clipper's state is unchanged"
            )
        return self.nonfinite == "skip"

    def _record(self, total: float, threshold: float | None, skipped: bool) -> None:
        """Describe a call that succeeded (a refused call leaves the last one's)."""
        self.last_total_norm = total
        self.last_threshold = threshold
        self.last_step_skipped = skipped

    def __call__(self, grads: Any, params: Any = None) -> Any:
        """Clip ``grads`` in place; return the total norm before clipping."""
        return self._run(grads, params, inplace=True)[1]

    def clip(self, grads: Any, params: Any = None) -> tuple[list[Any], Any]:
        """Out-of-place twin of ``__call__``: ``(new_grads, total_norm)``, same state update."""
        return self._run(grads, params, inplace=False)

    def _run(self, grads: Any, params: Any, inplace: bool) -> tuple[list[Any], Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Configuration and state as plain numbers, strings and lists (JSON-able)."""
        sd = self._config()
        sd["ord"] = _json_ord(sd["ord"])
        sd["step"] = self.step
        sd.update(self._state())
        return sd

    #: Keys :meth:`_state` adds to the configuration in :meth:`state_dict`.
    _STATE_KEYS: tuple[str, ...] = ()

    def _state(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore configuration and state from :meth:`state_dict`'s output.

        The keys must be exactly those this class's :meth:`state_dict` gives
        (a ValueError names the missing and unexpected ones, as torch's
        ``load_state_dict`` does); the values are validated as the
        constructor validates them, the statistics for their types, ranges and
        consistency with ``step`` (a TypeError or ValueError naming the key).
        A refused load leaves the clipper as it was.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{type(self).__name__}.load_state_dict needs a dict, got "
                f"{type(state_dict).__name__}"
            )
        sd = dict(state_dict)
        names = inspect.signature(type(self).__init__).parameters
        expected = (set(names) - {"self"}) | {"step"} | set(self._STATE_KEYS)
        missing = sorted(expected - sd.keys())
        unexpected = sorted(sd.keys() - expected, key=repr)  # keys of any type
        if missing or unexpected:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}, unexpected "
                f"keys {unexpected} (is it the state of another clipper class?)"
            )
        for key, value in sd.items():
            # state_dict() holds plain numbers, strings and lists: an array or another
            # object would be read (0-d arrays by the constructor) as something else.
            if value is not None and not isinstance(value, (numbers.Real, str, list, tuple)):
                raise TypeError(
                    f"{type(self).__name__}.load_state_dict: {key!r} must be a number, a "
                    f"string, a list or None, got {type(value).__name__}"
                )
        cfg = {k: sd[k] for k in names if k != "self"}
        fresh = type(self)(**cfg)  # validates; self is untouched until all of it loaded
        fresh.step = _int(sd["step"], "step", 0)
        fresh._load_state(sd)
        self.__dict__.update(fresh.__dict__)

    def _load_state(self, sd: dict[str, Any]) -> None:
        pass


class _GlobalNormBased(_Clipper):
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

    def _run(self, grads: Any, params: Any, inplace: bool) -> tuple[list[Any], Any]:
        items = _dispatch.as_array_list(grads)
        if not items:
            self._record(0.0, None, False)
            return [], _api.global_norm([])
        check = inplace
        if inplace and not _core_checks_writes(items[0]):
            # The generic (Array API) route writes array after array without these
            # checks: a bad second gradient would fail after the first was written.
            _check_writable(items, type(self).__name__)
            check = False
        total = _api.global_norm(items, self.ord)
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
            return _copies(items)
        if check:
            _check_writable(items, type(self).__name__)
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


class GlobalNormClipper(_GlobalNormBased):
    r"""Clip the global norm of all gradients to ``max_norm`` (the plain case).

    .. math:: g_k \leftarrow g_k \cdot \min\Big(1, \frac{c}{\|(g_1,\ldots,g_n)\|_p
              + \varepsilon}\Big)

    exactly ``torch.nn.utils.clip_grad_norm_`` (``eps = 1e-6``) behind the
    clipper interface, so a training loop can switch clippers freely.

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
        self.ord = _ord_value(ord)
        self.eps = check_eps(eps)
        self._init_common(nonfinite)

    def _config(self) -> dict[str, Any]:
        return dict(max_norm=self.max_norm, ord=self.ord, eps=self.eps, nonfinite=self.nonfinite)

    def _threshold(self, value: float) -> tuple[float | None, Callable[[bool], None]]:
        return self.max_norm, _noop


# ----------------------------------------------------------------- AutoClip


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


class AutoClip(_GlobalNormBased):
    percentile: float
    history: int | None

    r"""AutoClip: clip to the ``percentile``-th percentile of all gradient norms so far.

    Seetharaman, Wichern, Pardo, Le Roux (2020), "AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks", arXiv:2007.14469.  At step
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
        percentile_v = _real(percentile, "percentile", ge=0, le=100)
        self.history = None if history is None else _int(history, "history", 1)
        self.percentile = percentile_v
        self.ord = _ord_value(ord)
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
        norms = _norm_list(sd["norms"], "norms")
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


# -------------------------------------------------------------------- ZClip


class ZClip(_GlobalNormBased):
    r"""ZClip: z-score clipping of gradient-norm spikes against EMA statistics.

    Kumar, Owen, Ashraf, Wei, Qiu, Li (2025), "ZClip: Adaptive Spike Mitigation
    for LLM Pre-Training", arXiv:2504.02507; reference implementation
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
        default is 1.0 (``max_grad_norm``); here, as the issue asks, None.
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
        self.alpha = _real(alpha, "alpha", gt=0, lt=1)
        self.z_thresh = _real(z_thresh, "z_thresh", gt=0)
        self.warmup_steps = _int(warmup_steps, "warmup_steps", 1)
        self.mode = _choice(mode, "mode", ("zscore", "percentile"))
        self.max_norm = None if max_norm is None else check_max_norm(max_norm)
        self.clip_option = _choice(clip_option, "clip_option", ("adaptive_scaling", "mean"))
        self.clip_factor = _real(clip_factor, "clip_factor", gt=0)
        self.eps = check_eps(eps)
        self.skip_update_on_spike = _flag(skip_update_on_spike, "skip_update_on_spike")
        self.ord = _ord_value(ord)
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
        initialized = _flag(sd["initialized"], "initialized")
        mean, var = _state_real(sd["mean"], "mean"), _state_real(sd["var"], "var")
        buffer = _norm_list(sd["buffer"], "buffer")
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
            return threshold, _noop
        x = value if target is None else target

        def settle(ok: bool) -> None:
            if not ok:
                return
            assert self.mean is not None and self.var is not None
            self.mean = mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * _square(x - mean)

        return threshold, settle


# ---------------------------------------------------------------------- AGC

_LAYOUTS = ("torch", "optax")


def _agc_axis(axis: Any) -> str | tuple[int, ...]:
    """A layout name, or explicit reduction axes as a tuple of distinct ints (a
    list too: ``state_dict`` stores them as one)."""
    if isinstance(axis, str):
        if axis.lower() not in _LAYOUTS:
            raise ValueError(f"axis must be 'torch', 'optax' or reduction axes, got {axis!r}")
        return axis.lower()
    items = (axis,) if isinstance(axis, numbers.Integral) else axis
    if not isinstance(items, (tuple, list)) or not all(
        isinstance(a, numbers.Integral) and not isinstance(a, (bool, np.bool_)) for a in items
    ):
        raise TypeError(f"axis must be 'torch', 'optax', an int or a tuple of ints, got {axis!r}")
    out = tuple(int(a) for a in items)
    if len(set(out)) != len(out):
        raise ValueError(f"axis must not repeat an axis, got {axis!r}")
    return out


class AGC(_Clipper):
    r"""Adaptive gradient clipping, unit-wise (Brock, De, Smith, Simonyan 2021).

    "High-Performance Large-Scale Image Recognition Without Normalization",
    arXiv:2102.06171, section 4.  For every *unit* :math:`i` of a parameter
    :math:`W` (a row of output channels, see ``axis``) with gradient :math:`G`:

    .. math::

        m_i = \lambda\,\max(\|W_i\|_F, \epsilon), \qquad
        G_i \leftarrow G_i \cdot \min\Big(1, \frac{m_i}{\max(\|G_i\|_F, 10^{-6})}\Big)

    (equal to timm's and optax's ``where(||G_i|| < m_i, G_i, G_i m_i /
    max(||G_i||, 1e-6))``, NaN included).  The paper recommends not clipping
    the final classifier layer: pass only the parameters to clip.

    Parameters
    ----------
    clipping : float, default 0.01
        :math:`\lambda`, finite and > 0.
    eps : float, default 1e-3
        Floor of the parameter norm (so zero-initialised weights can move).
    axis : {"torch", "optax"} or int or tuple of int, default "torch"
        How a tensor splits into units:

        - ``"torch"`` (timm's ``unitwise_norm``, output-first layouts
          ``[out, in]``, ``[out, in, kh, kw]``): one unit per index of axis 0,
          norm over all other axes; arrays with ``ndim <= 1`` are one unit;
        - ``"optax"`` (optax ``unitwise_norm``, JAX/Keras ``[in, out]`` and
          ``HWIO`` kernels): squeezed ``ndim <= 1`` one unit; ``ndim`` 2 or 3
          reduce axis 0; ``ndim`` 4 reduce axes (0, 1, 2); other ranks raise;
        - explicit reduction axes for every array with ``ndim >= 2``.
    ord : float, default 2
        Order of the unit norms (timm's ``norm_type``).
    nonfinite : {"propagate", "error", "skip"}
        Applied to the total gradient norm (see the module docstring).

    Returns (from a call)
    ---------------------
    The global norm of the gradients before clipping, computed from the unit
    norms (no extra pass).

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.adaptive import AGC
    >>> w = np.array([[1.0, 0.0], [0.0, 10.0]], np.float32)  # two output units
    >>> g = np.array([[3.0, 4.0], [0.0, 0.05]], np.float32)
    >>> agc = AGC(clipping=0.1)
    >>> round(float(agc([g], [w])), 5)
    5.00025
    >>> g  # unit 0: |g| = 5 > 0.1 * 1, scaled to norm 0.1; unit 1 kept
    array([[0.06, 0.08],
           [0.  , 0.05]], dtype=float32)
    """

    def __init__(
        self,
        clipping: float = 0.01,
        eps: float = 1e-3,
        axis: str | int | tuple[int, ...] = "torch",
        ord: float = 2,
        *,
        nonfinite: str = "propagate",
    ) -> None:
        self.clipping = _real(clipping, "clipping", gt=0)
        self.eps = check_eps(eps)
        self.axis: Any = _agc_axis(axis)
        self.ord = _ord_value(ord)
        self._init_common(nonfinite)

    def _config(self) -> dict[str, Any]:
        axis = self.axis if isinstance(self.axis, str) else list(self.axis)
        return dict(
            clipping=self.clipping, eps=self.eps, axis=axis, ord=self.ord, nonfinite=self.nonfinite
        )

    def unit_axes(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The reduction axes of one array's unit norms (None: the whole array is one unit)."""
        ndim = len(shape)
        if self.axis == "torch":
            return None if ndim <= 1 else tuple(range(1, ndim))
        if self.axis == "optax":
            if sum(1 for s in shape if s != 1) <= 1:
                return None
            if ndim in (2, 3):
                return (0,)
            if ndim == 4:
                return (0, 1, 2)
            raise ValueError(f"AGC(axis='optax') handles arrays of rank <= 4, got shape {shape}")
        return None if ndim <= 1 else self.axis  # type: ignore[no-any-return]

    def _coefficients(self, gs: list[Any], ps: list[Any], xp: Any) -> tuple[list[Any], float, bool]:
        """Per-unit scale factors of every gradient (in its dtype), the power sum of
        all unit norms, and whether any norm is float64."""
        coefs = []
        total = 0.0
        wide = False
        for g, p in zip(gs, ps):
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"AGC: gradient shape {g.shape} != parameter shape {p.shape}")
            axes = self.unit_axes(tuple(g.shape))
            keep = axes is not None
            gn = _api.norm(g, self.ord, axis=axes, keepdims=keep)
            pn = _api.norm(p, self.ord, axis=axes, keepdims=keep)
            wide = wide or gn.dtype == xp.float64
            total = _accumulate(total, gn, self.ord, xp)
            mx = xp.maximum(pn, xp.asarray(self.eps, dtype=pn.dtype)) * self.clipping
            ratio = mx / xp.maximum(gn, xp.asarray(1e-6, dtype=gn.dtype))
            c = xp.where(ratio >= 1.0, xp.ones_like(ratio), ratio)
            coefs.append(xp.astype(c, g.dtype) if c.dtype != g.dtype else c)
        return coefs, total, wide

    def _run(self, grads: Any, params: Any, inplace: bool) -> tuple[list[Any], Any]:
        import array_api_compat as aac

        if params is None:
            raise ValueError("AGC needs the parameters: call agc(grads, params)")
        gs = _dispatch.as_array_list(grads)
        ps = _dispatch.as_array_list(params)
        if len(gs) != len(ps):
            raise ValueError(f"AGC: {len(gs)} gradients for {len(ps)} parameters")
        if not gs:
            self._record(0.0, None, False)
            return [], _api.global_norm([])
        if inplace:
            _check_writable(gs, "AGC")
        xp = aac.array_namespace(gs[0])
        # Every coefficient first: a bad gradient or parameter anywhere in the lists
        # raises before the first gradient is scaled.  inf and NaN follow IEEE (as
        # torch's do) without NumPy's overflow warnings.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            coefs, total, wide = self._coefficients(gs, ps, xp)
        value = _finish(total, self.ord)
        total_arr = xp.asarray(value, dtype=xp.float64 if wide else xp.float32)
        if not math.isfinite(value) and self._nonfinite(value):
            out = gs if inplace else _copies(gs)
            self._record(value, None, True)
            return out, total_arr
        if inplace:
            for g, c in zip(gs, coefs):
                if aac.is_torch_array(g):
                    # detach(): a gradient that requires grad would refuse mul_ (the
                    # core's kernels write its memory the same way)
                    g.detach().mul_(c)
                else:
                    g *= c
            out = gs
        else:
            out = [g * c for g, c in zip(gs, coefs)]
        self.step += 1
        self._record(value, None, False)
        return out, total_arr


def _accumulate(total: float, norms: Any, ord: float, xp: Any) -> float:
    """Add unit norms to a running power sum (max for inf), in float64."""
    if math.isinf(ord):
        m = float(xp.max(norms))
        return math.nan if (math.isnan(m) or math.isnan(total)) else max(total, m)
    return total + float(xp.sum(xp.astype(norms, xp.float64) ** ord))


def _finish(total: float, ord: float) -> float:
    if math.isinf(ord) or ord == 1:
        return total
    if ord == 2:
        return math.sqrt(total)
    try:
        return float(total ** (1.0 / ord))
    except OverflowError:  # ord < 1: a huge power sum's root can pass the float range
        return math.inf
