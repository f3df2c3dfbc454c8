"""fastclip's exception and warning classes, and the messages more than one route raises.

A leaf: imports nothing from fastclip.  The classes are re-exported as
``fastclip.NonFiniteNormError``, ``fastclip.GPUUnavailableError`` and
``fastclip.CacheWarning`` (their ``__module__`` says so, for reprs and docs).
"""

from __future__ import annotations

__all__ = [
    "CacheWarning",
    "GPUUnavailableError",
    "NonFiniteNormError",
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

    A ``RuntimeError``, as ``torch.nn.utils.clip_grad_norm_`` raises.
    """


class GPUUnavailableError(RuntimeError):
    """A device array reached fastclip but its GPU route (CuPy) cannot run here."""


for _cls in (CacheWarning, NonFiniteNormError, GPUUnavailableError):
    _cls.__module__ = "fastclip"
del _cls


def nonfinite_message(value: float) -> str:
    """What ``clip_by_global_norm(..., error_if_nonfinite=True)`` says on every route."""
    return (
        f"the total norm is non-finite ({value}), so the arrays were not clipped; "
        "pass error_if_nonfinite=False to scale them by it anyway"
    )


def nonfinite_step_message(what: str, value: float) -> str:
    """What a fused step with ``nonfinite="error"`` says on every route."""
    return f"{what}: the total gradient norm is non-finite ({value}); nothing was updated"


def torch_nonfinite_message(norm_type: float) -> str:
    """torch's words for a non-finite total norm with ``error_if_nonfinite=True``.

    Said by ``fastclip.torch`` and by ``fastclip.distributed``'s
    ``get_total_norm`` / ``clip_grad_norm_`` (the DTensor path of the same calls).
    """
    return (
        f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
        "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
        "by the non-finite norm anyway, set `error_if_nonfinite=False`"
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
