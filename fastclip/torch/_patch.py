"""``patch()`` / ``unpatch()``: route ``torch.nn.utils``' clipping functions to fastclip.

Trainers that clip with torch's functions (Lightning's ``gradient_clip_val``,
Hugging Face's ``Trainer(max_grad_norm=...)``, ``accelerate``) then run
fastclip's kernels with no change to their code.  What is replaced is the
module attribute: code that calls ``torch.nn.utils.clip_grad_norm_(...)``, or
imports it inside the function that calls it, sees fastclip's function; code
that bound torch's function to a name of its own before ``patch()`` keeps it.

The audit behind ``_PLACES`` (lightning 2.6.6, transformers 5.24.0,
accelerate 1.16.0, read in their installed source):

* Lightning (``lightning.pytorch`` and the ``pytorch_lightning`` copy):
  ``Precision.clip_grad_by_norm`` / ``clip_grad_by_value`` (plugins/precision/
  precision.py) call ``torch.nn.utils.clip_grad_norm_(parameters, clip_val)``
  and ``torch.nn.utils.clip_grad_value_``: looked up when called.  The FSDP
  plugin refuses norm clipping; Fabric's ``Strategy.clip_gradients_norm`` /
  ``clip_gradients_value`` (fabric/strategies/strategy.py) also call
  ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``; Fabric's FSDP
  strategies call the module's own ``clip_grad_norm_`` (not torch.nn.utils).
* accelerate: ``Accelerator.clip_grad_norm_`` (no FSDP1, DeepSpeed or XLA)
  calls ``_clip_grad_norm_dtensor_aware``, which does
  ``from torch.nn.utils import clip_grads_with_norm_, get_total_norm`` inside
  the function (read at each call), then per device mesh ``get_total_norm``,
  one ``torch.linalg.vector_norm`` over those norms, and
  ``clip_grads_with_norm_`` (skipped when ``max_norm`` is inf); it calls
  ``torch.nn.utils.clip_grad_norm_`` only where ``torch.distributed`` is not
  available.  ``Accelerator.clip_grad_value_`` calls
  ``torch.nn.utils.clip_grad_value_``.
* transformers: ``Trainer._clip_grad_norm`` calls
  ``self.accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)``
  (above); its mixed-mesh path does the same function-local import of
  ``get_total_norm`` and ``clip_grads_with_norm_``.

None binds a function at import time, so only torch's two modules are patched.
"""

from __future__ import annotations

import threading
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad

from ._clip_grad import (
    TensorOrTensors,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
)

__all__ = ["PatchHandle", "is_patched", "patch", "unpatch"]


def clip_grad_norm(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """torch's deprecated ``clip_grad_norm``, on fastclip: torch's FutureWarning, then
    :func:`fastclip.torch.clip_grad_norm_`."""
    warnings.warn(  # torch's message and category (typing_extensions.deprecated)
        "`torch.nn.utils.clip_grad_norm` is now deprecated "
        "in favor of `torch.nn.utils.clip_grad_norm_`.",
        FutureWarning,
        stacklevel=2,
    )
    return clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


clip_grad_norm.__module__ = "fastclip.torch"

# Each torch name and what patch() puts there.
_REPLACEMENTS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("clip_grad_norm_", clip_grad_norm_),
    ("clip_grad_value_", clip_grad_value_),
    ("get_total_norm", get_total_norm),
    ("clip_grads_with_norm_", clip_grads_with_norm_),
    ("clip_grad_norm", clip_grad_norm),  # deprecated alias, still in torch 2.13
)

# Every module whose attributes patch() replaces (the names above that it has).
_PLACES: tuple[types.ModuleType, ...] = (
    # The public path: `torch.nn.utils.clip_grad_norm_(...)` as Lightning's precision
    # plugins, Fabric's strategies and accelerate call it, and the function-local
    # `from torch.nn.utils import get_total_norm, clip_grads_with_norm_` of accelerate
    # and transformers (module docstring).
    torch.nn.utils,
    # The defining module, for `from torch.nn.utils.clip_grad import clip_grad_norm_`
    # run after patch().  In torch 2.13 it has clip_grad_norm_, clip_grad_value_ and
    # clip_grad_norm only (get_total_norm and clip_grads_with_norm_ are `_`-private
    # there, left alone: torch's own clip_grad_norm_ calls them).
    torch.nn.utils.clip_grad,
)

_lock = threading.RLock()  # around every read-modify-write of the state below
_originals: list[tuple[types.ModuleType, str, object]] = []  # empty: not patched
_plain = False  # a patch() call outside a `with` block is in force
_holds = 0  # open `with patch():` blocks
_generation = 0  # +1 at each restore: handles of an earlier patching do nothing


def _install() -> None:
    if _originals:  # already patched: never wrap fastclip's functions, never save them
        return
    for module in _PLACES:
        for name, replacement in _REPLACEMENTS:
            if hasattr(module, name):  # only the names the installed torch has
                _originals.append((module, name, getattr(module, name)))
                setattr(module, name, replacement)


def _restore() -> None:
    global _plain, _holds, _generation
    for module, name, original in reversed(_originals):
        setattr(module, name, original)
    _originals.clear()
    _plain = False
    _holds = 0
    _generation += 1


class PatchHandle:
    """What :func:`patch` returns: a context manager; leaving the ``with`` block
    restores torch's functions unless another block or a plain ``patch()`` still
    holds the patch (see :func:`patch`)."""

    __slots__ = ("_created", "_entered", "_made_plain")

    def __init__(self, made_plain: bool) -> None:
        self._made_plain = made_plain
        self._created = _generation
        self._entered: int | None = None  # the generation its `with` block holds

    def __enter__(self) -> PatchHandle:
        global _plain, _holds
        with _lock:
            if self._entered is not None:
                raise RuntimeError("a patch() handle can be entered once; call patch() again")
            _install()  # again if unpatch() ran between patch() and `with`
            if self._made_plain and self._created == _generation:
                _plain = False  # this `with` statement's own patch(): held by the block only
            _holds += 1
            self._entered = _generation
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _holds
        with _lock:
            if self._entered != _generation:  # unpatch() has already restored torch
                return
            _holds -= 1
            if _holds == 0 and not _plain:
                _restore()


def patch() -> PatchHandle:
    """Route ``torch.nn.utils``' gradient clipping functions to :mod:`fastclip.torch`.

    Replaces, in ``torch.nn.utils`` and in ``torch.nn.utils.clip_grad``, each
    of these that the installed torch has: ``clip_grad_norm_``,
    ``clip_grad_value_``, ``get_total_norm`` and ``clip_grads_with_norm_`` by
    fastclip.torch's function of that name (the same objects: same results
    and errors as calling :mod:`fastclip.torch` directly), and the deprecated
    ``clip_grad_norm`` by a function that gives torch's FutureWarning and
    calls :func:`fastclip.torch.clip_grad_norm_`.  Lightning's
    ``gradient_clip_val``, ``accelerate``'s ``Accelerator.clip_grad_norm_`` and
    Hugging Face's ``Trainer(max_grad_norm=...)`` then clip with fastclip.

    Returns
    -------
    PatchHandle
        A context manager: ``with fastclip.torch.patch(): ...`` restores torch's
        functions when the block is left (also on an exception).  A plain call,
        not in a ``with``, stays in force until :func:`unpatch`.

    Notes
    -----
    Idempotent: patching an already patched torch changes nothing (no double
    wrapping), and :func:`unpatch` restores torch's own functions (the same
    objects as before the first ``patch()``).

    Nesting is counted, not stacked: torch's functions stay replaced while any
    ``with patch():`` block is open or a plain ``patch()`` call is in force,
    so blocks may close in any order (as from several threads).  Plain calls
    are not counted: one :func:`unpatch` undoes them all, and restores torch
    at once even inside open blocks (whose exits then change nothing).  A lock
    serialises ``patch``, ``unpatch`` and the blocks' entries and exits; the
    patch itself is process-wide (every thread sees it).

    Code that bound torch's function to a name of its own before ``patch()``
    (``from torch.nn.utils import clip_grad_norm_`` at module level) keeps
    torch's function.  Lightning 2.6, transformers 5.24 and accelerate 1.16
    look the functions up when they clip, so they are routed (the audit is in
    the "Trainers with no code change" recipe).

    Examples
    --------
    >>> import torch, fastclip.torch as fct
    >>> torch_clip = torch.nn.utils.clip_grad_norm_
    >>> model = torch.nn.Linear(3, 2)
    >>> model(torch.ones(4, 3)).sum().backward()
    >>> with fct.patch():
    ...     routed = torch.nn.utils.clip_grad_norm_ is fct.clip_grad_norm_
    ...     total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    >>> routed, fct.is_patched(), torch.nn.utils.clip_grad_norm_ is torch_clip
    (True, False, True)
    >>> bool(fct.get_total_norm(model) <= 1.0)
    True
    """
    global _plain
    with _lock:
        _install()
        made_plain = not _plain
        _plain = True
        return PatchHandle(made_plain)


def unpatch() -> None:
    """Restore torch's own clipping functions, replaced by :func:`patch`.

    Every attribute :func:`patch` replaced gets back the object it had before
    (``torch.nn.utils.clip_grad_norm_ is`` torch's function again), at once,
    also inside open ``with patch():`` blocks.  Does nothing when torch is
    not patched.

    Examples
    --------
    >>> import torch, fastclip.torch as fct
    >>> torch_clip = torch.nn.utils.clip_grad_norm_
    >>> _ = fct.patch()
    >>> fct.is_patched(), torch.nn.utils.clip_grad_norm_ is fct.clip_grad_norm_
    (True, True)
    >>> fct.unpatch()
    >>> fct.is_patched(), torch.nn.utils.clip_grad_norm_ is torch_clip
    (False, True)
    """
    with _lock:
        if _originals:
            _restore()


def is_patched() -> bool:
    """Whether :func:`patch` has replaced torch's clipping functions (and
    :func:`unpatch` or the end of the ``with`` blocks has not restored them).

    Examples
    --------
    >>> import fastclip.torch as fct
    >>> fct.is_patched()
    False
    >>> with fct.patch():
    ...     fct.is_patched()
    True
    """
    with _lock:
        return bool(_originals)


for _function in (patch, unpatch, is_patched):
    _function.__module__ = "fastclip.torch"
del _function
