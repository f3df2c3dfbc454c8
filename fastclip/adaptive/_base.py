"""The clippers' shared parts: the ``Clipper`` base class (policy, step counter,
``last_*`` attributes, ``state_dict`` / ``load_state_dict``), the checks of
hyperparameters and of loaded statistics, and the refusal, before any write, of
gradients that cannot all be scaled in place.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import _dispatch
from .._errors import NonFiniteNormError, public_method
from .._memory import shared_pair
from .._validate import NONFINITE_POLICIES, check_nonfinite, check_ord, scalar_value

__all__ = [
    "Clipper",
    "bool_param",
    "check_writable",
    "choice_param",
    "copies",
    "core_checks_writes",
    "int_param",
    "ord_value",
    "real_param",
    "recorded_norms",
    "recorded_statistic",
    "settle_nothing",
]


# ------------------------------------------------------------ argument checks


def _check_policy(policy: Any) -> str:
    """``check_nonfinite``, with a TypeError for a non-string (``["skip"]``), as
    ``tests/api/test_safety_adaptive.py::test_bad_states_are_refused_and_leave_the_clipper_unchanged``
    expects of a loaded state."""
    if not isinstance(policy, str):
        raise TypeError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return check_nonfinite(policy)


def real_param(
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


def int_param(value: Any, name: str, minimum: int) -> int:
    """An integer hyperparameter (bool and float refused with a TypeError)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def bool_param(value: Any, name: str) -> bool:
    """A bool: any other object (``"False"`` is truthy) is a TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def choice_param(value: Any, name: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {options}, got {value!r}")
    if value.lower() not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value.lower()


def recorded_norms(values: Any, name: str) -> list[float]:
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


def recorded_statistic(value: Any, name: str) -> float | None:
    """A statistic from a state dict: None, or a real number >= 0 (NaN and +inf
    included: the "propagate" policy lets non-finite norms into the statistics)."""
    if value is None:
        return None
    return recorded_norms([value], name)[0]


def ord_value(ord: Any) -> float:
    return check_ord(ord)[1]


def _json_ord(p: float) -> Any:
    return "inf" if math.isinf(p) else p


def copies(items: list[Any]) -> list[Any]:
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
        view = _dispatch.backend_of(t).lib.storage(t)  # the CPU route's storage view
    else:
        try:  # array-api-strict and other CPU libraries that export DLPack
            view = np.from_dlpack(a)
        except Exception:
            return None
    lo, hi = np.lib.array_utils.byte_bounds(view)
    return view.shape, view.strides, lo, hi, None if view.flags.c_contiguous else view


def core_checks_writes(a: Any) -> bool:
    """Whether the core's in-place clip of such arrays (the Numba and GPU routes)
    refuses read-only, stride-0 and overlapping arrays before its first write."""
    import array_api_compat as aac

    return isinstance(a, np.ndarray) or aac.is_torch_array(a)


def check_writable(items: list[Any], what: str) -> None:
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


def settle_nothing(ok: bool) -> None:
    pass


class Clipper:
    """Shared bookkeeping: policy, step counter, last-call attributes."""

    nonfinite: str
    step: int
    last_total_norm: float | None
    last_threshold: float | None
    last_step_skipped: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every fastclip clipper's constructor names its class in its TypeErrors
        # and ValueErrors ("fastclip.adaptive.ZClip: alpha must be ..."), whichever
        # module defines it; a user's subclass keeps its own constructor's errors.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and cls.__module__.startswith("fastclip."):
            cls.__init__ = public_method("__init__")(init)  # type: ignore[method-assign]

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

    @public_method("__call__", "grads")
    def __call__(self, grads: Any, params: Any = None, *, total_norm: Any = None) -> Any:
        """Clip ``grads`` in place; return the total norm before clipping.

        ``total_norm``: the global norm of ``grads`` computed elsewhere (the
        norm over every rank, from :func:`fastclip.distributed.clip_with_`),
        used as given instead of being computed from ``grads``.
        """
        return self._run(grads, params, inplace=True, given=total_norm)[1]

    @public_method("clip", "grads")
    def clip(
        self, grads: Any, params: Any = None, *, total_norm: Any = None
    ) -> tuple[list[Any], Any]:
        """Out-of-place twin of ``__call__``: ``(new_grads, total_norm)``, same state update."""
        return self._run(grads, params, inplace=False, given=total_norm)

    def _run(
        self, grads: Any, params: Any, inplace: bool, given: Any = None
    ) -> tuple[list[Any], Any]:
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

    @public_method("load_state_dict")
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
                "state_dict needs a dict (what .state_dict() returns), got "
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
        fresh.step = int_param(sd["step"], "step", 0)
        fresh._load_state(sd)
        self.__dict__.update(fresh.__dict__)

    def _load_state(self, sd: dict[str, Any]) -> None:
        pass
