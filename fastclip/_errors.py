"""fastclip's exception and warning classes, and the messages more than one route raises.

A leaf: imports nothing from fastclip.  The classes are re-exported as
``fastclip.NonFiniteNormError``, ``fastclip.GPUUnavailableError`` and
``fastclip.CacheWarning`` (their ``__module__`` says so, for reprs and docs).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from numpy.exceptions import AxisError

__all__ = [
    "CacheWarning",
    "GPUUnavailableError",
    "NonFiniteNormError",
    "name_error",
    "nonfinite_detail",
    "nonfinite_error",
    "nonfinite_message",
    "nonfinite_step_message",
    "out_of_place_hint",
    "public",
    "public_method",
    "raise_overlap",
    "torch_nonfinite_message",
]


class CacheWarning(RuntimeWarning):
    """fastclip's on-disk kernel cache was unsafe, unreadable or unavailable.

    The message says what was found and what fastclip did about it (a private
    ``fastclip-<uid>`` folder, a recompiled entry, or no on-disk cache).
    """


class NonFiniteNormError(RuntimeError):
    """The norm is NaN or inf and ``error_if_nonfinite=True`` was asked for.

    A ``RuntimeError``, as ``torch.nn.utils.clip_grad_norm_`` raises, and
    constructible from a message alone.

    Attributes
    ----------
    indices : tuple of int
        Positions, in the list the caller passed, of the arrays whose own norm
        is not finite (in ``fastclip.torch``: positions among the gradients
        that are not None); empty when unknown, or when every array's norm is
        finite and only their sum overflowed.
    names : tuple of str or None
        The parameter names of those arrays, when they came from an
        ``nn.Module`` (``fastclip.torch``); else None.
    """

    def __init__(
        self, message: str = "", indices: Iterable[int] = (), names: Iterable[str] | None = None
    ) -> None:
        super().__init__(message)
        self.indices: tuple[int, ...] = tuple(int(i) for i in indices)
        self.names: tuple[str, ...] | None = None if names is None else tuple(names)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the attributes through pickling (multiprocessing, dask workers):
        # BaseException pickles ``self.args`` only, the message.
        return (type(self), (str(self), self.indices, self.names))


class GPUUnavailableError(RuntimeError):
    """A device array reached fastclip but its GPU route (CuPy) cannot run here."""


for _cls in (CacheWarning, NonFiniteNormError, GPUUnavailableError):
    _cls.__module__ = "fastclip"
del _cls


def nonfinite_message(value: float, indices: Sequence[int] = ()) -> str:
    """What ``clip_by_global_norm(..., error_if_nonfinite=True)`` says on every route."""
    return (
        f"the total norm is non-finite ({value}), so the arrays were not clipped"
        f"{nonfinite_detail(indices)}; pass error_if_nonfinite=False to scale them by it anyway"
    )


# At most this many positions or names are spelled out in a message (all are in
# the error's ``indices`` / ``names``).
_SHOWN = 8


def nonfinite_detail(
    indices: Sequence[int], names: Sequence[str] | None = None, noun: str = "array"
) -> str:
    """``" (non-finite norms: arrays 1 and 3)"``, naming parameters when ``names``
    are known; empty when no single array's norm is non-finite."""
    if not indices:
        return ""
    items = [repr(n) for n in names] if names is not None else [str(i) for i in indices]
    what = "parameter" if names is not None else noun
    shown = ", ".join(items[:_SHOWN])
    if len(items) > _SHOWN:
        shown += f" and {len(items) - _SHOWN} more"
    elif len(items) > 1:
        shown = ", ".join(items[:-1]) + " and " + items[-1]
    plural = "s" if len(items) > 1 else ""
    return f" (non-finite norm{plural}: {what}{plural} {shown})"


def nonfinite_error(
    value: float, indices: Sequence[int] = (), names: Sequence[str] | None = None
) -> NonFiniteNormError:
    """The error of a non-finite total norm, with the arrays that make it so."""
    return NonFiniteNormError(nonfinite_message(value, indices), indices, names)


def nonfinite_step_message(what: str, value: float) -> str:
    """What a fused step with ``nonfinite="error"`` says on every route."""
    return f"{what}: the total gradient norm is non-finite ({value}); nothing was updated"


def torch_nonfinite_message(
    norm_type: float, indices: Sequence[int] = (), names: Sequence[str] | None = None
) -> str:
    """torch's words for a non-finite total norm with ``error_if_nonfinite=True``.

    Said by ``fastclip.torch`` and by ``fastclip.distributed``'s
    ``get_total_norm`` / ``clip_grad_norm_`` (the DTensor path of the same calls).
    """
    return (
        f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
        "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
        "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        f"{nonfinite_detail(indices, names, 'gradient')}"
    )


def out_of_place_hint(what: str) -> str:
    """What to do instead of the in-place ``what_`` (``scale_`` has no twin)."""
    if what == "scale":
        return "scale a copy of it instead"
    return f"use the out-of-place fastclip.{what}() instead"


def raise_overlap(i: int, j: int) -> None:
    """ValueError naming two arrays of an in-place call that share memory."""
    raise ValueError(
        f"arrays {i} and {j} of this in-place call share memory; they would be scaled "
        "twice. Pass each piece of memory once."
    )


# ------------------------------------------------ errors that name the function

_F = TypeVar("_F", bound=Callable[..., Any])

# A message may already start with a name: an inner public call's prefix
# ("fastclip.clip_by_global_norm_: "), or a short one that the routes were handed
# ("adamw_step_: ", "FusedAdamW: ", "ZClip.load_state_dict: ").  Such a head is
# replaced by the public name, not repeated.
_HEAD = re.compile(r"(fastclip(?:\.\w+)+|\w+(?:\.\w+)*): ")
# How the dispatch layer names a list item it refuses; the public function that
# knows the argument's name rewrites it as ``grads[3]``.
_ITEM = re.compile(r"\bitem (\d+) of the list\b")
_EXPECTED = "expected an array"
# The routes name the operation they were asked for ("clip_by_norm_ got a read-only
# array", "clip_by_global_norm needs floating-point arrays"), which is not always
# the function the user called: the public name replaces it.
_ROUTE_OP = re.compile(
    r"(?:clip_by_global_norm|clip_by_norm|clip_by_value|global_norm|normalize|norm|scale)_? "
    r"(?=got |needs )"
)


def name_error(exc: BaseException, name: str, arg: str | None = None) -> None:
    """Prefix ``exc``'s message with ``"name: "`` in place (same object, same class).

    Called on the way out of every public entry point, so the outermost public
    call the user made names itself: an inner public call's prefix is replaced,
    not repeated.  With ``arg`` (the name of the array argument), the dispatch
    layer's "item 3 of the list" becomes ``arg[3]``, a leading "expected an
    array" becomes "``arg`` must be an array" and a leading "the array" ``arg``.  Messages that are not a plain
    single string (``UnicodeError``'s, for one) are left as they are; for
    ``numpy.exceptions.AxisError`` the name becomes its ``msg_prefix``.
    """
    if isinstance(exc, AxisError) and exc.axis is not None:
        exc._msg = name  # type: ignore[attr-defined]  # its msg_prefix (numpy has no setter)
        return
    raw = exc.__dict__.get("_fastclip_raw")
    if raw is None:
        if len(exc.args) != 1 or not isinstance(exc.args[0], str) or str(exc) != exc.args[0]:
            return
        raw = exc.args[0]
        head = _HEAD.match(raw)
        if head is not None and _is_name(head.group(1), name):
            raw = raw[head.end() :]
        route_op = _ROUTE_OP.match(raw)
        if route_op is not None:
            raw = raw[route_op.end() :]
        exc.__dict__["_fastclip_raw"] = raw
    message = raw
    if arg is not None:
        if message.startswith(_EXPECTED):
            message = f"{arg} must be an array{message[len(_EXPECTED) :]}"
        elif message.startswith("the array "):
            message = f"{arg} {message[len('the array ') :]}"
        message = _ITEM.sub(lambda m: f"{arg}[{m.group(1)}]", message)
    exc.args = (f"{name}: {message}",)


def _is_name(head: str, name: str) -> bool:
    """Whether a message's ``head`` names a fastclip function (a qualified public
    name, or the short name of ``name`` or of its class: ``step: got 3 values``
    names an argument and stays)."""
    if head.startswith("fastclip."):
        return True
    parts = name.split(".")
    return all(part in parts[1:] for part in head.split("."))


def public(
    name: str, arg: str | None = None, *, tracing: Callable[[], bool] | None = None
) -> Callable[[_F], _F]:
    """Decorate a public function so its TypeErrors and ValueErrors name it.

    The exception is re-raised as the same object (class, traceback, cause
    kept) with ``"name: "`` before its message (see :func:`name_error`).  The
    wrapper costs one Python call: 0.12-0.25 us of CPU time, measured against
    the function's ``__wrapped__`` in one process (timeit with
    ``time.process_time``, interleaved), which is 2% of
    ``fastclip.torch.clip_grad_norm_`` on one tensor but 6-11% of the 1.9 us
    ``fastclip.norm`` of a 10-element array.  So the functions with a
    small-array fast path (``norm``, ``clip_by_norm_``, ``clip_by_global_norm_``)
    write the same ``try``/``except`` inline, after the fast path, which costs
    nothing until something is raised (Python 3.11's zero-cost exceptions).

    ``tracing`` (``torch.compiler.is_compiling`` for ``fastclip.torch``) is asked
    only when something was raised: while Dynamo traces, the message is left as
    it is, since Dynamo cannot trace the rewrite (torch 2.13: "Unsupported
    method call ... __dict__"); the eager call that follows names it.
    """

    def decorate(function: _F) -> _F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except (TypeError, ValueError) as exc:
                if tracing is None or not tracing():
                    name_error(exc, name, arg)
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


def public_method(
    method: str, arg: str | None = None, *, tracing: Callable[[], bool] | None = None
) -> Callable[[_F], _F]:
    """:func:`public` for a method: the name is read from the instance's class when
    something is raised (``fastclip.adaptive.ZClip.clip``; for ``__init__``, the
    class alone: ``fastclip.adaptive.ZClip``), so a base-class method names the
    subclass the user holds."""

    def decorate(function: _F) -> _F:
        @functools.wraps(function)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return function(self, *args, **kwargs)
            except (TypeError, ValueError) as exc:
                if tracing is not None and tracing():
                    raise
                cls = type(self)
                name = f"{cls.__module__}.{cls.__qualname__}"
                name_error(exc, name if method == "__init__" else f"{name}.{method}", arg)
                raise

        return wrapper  # type: ignore[return-value]

    return decorate
