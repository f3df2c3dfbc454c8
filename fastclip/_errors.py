"""fastclip's exception and warning classes, and the messages more than one route raises.

A leaf: imports nothing from fastclip.  The classes are re-exported as
``fastclip.NonFiniteNormError``, ``fastclip.GPUUnavailableError`` and
``fastclip.CacheWarning`` (their ``__module__`` says so, for reprs and docs).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CacheWarning",
    "GPUUnavailableError",
    "NonFiniteNormError",
    "nonfinite_detail",
    "nonfinite_error",
    "nonfinite_message",
    "nonfinite_step_message",
    "out_of_place_hint",
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
