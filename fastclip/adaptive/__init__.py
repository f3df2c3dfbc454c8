r"""Stateful gradient clippers: plain global norm, AutoClip, ZClip, AGC, AdaGC,
StableSPAMClip and QuantileClip (adaptive DP-SGD clipping).

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

:class:`AdaGC` clips each tensor against its own norm EMA (warm-up: global
clipping); :class:`QuantileClip` is not called on gradients but clips
per-sample gradients with ``.clip_per_sample(grads)`` (DP-SGD) and moves its
bound towards a quantile of the per-sample norms.  The optimizers whose step
the method defines, SPAM and Stable-SPAM, are :class:`fastclip.torch.SPAMAdamW`
and :class:`fastclip.torch.StableSPAMAdamW`; SPAM's element-wise clip against
any optimizer's second moments is :func:`spike_clip` / :func:`spike_clip_`, and
Stable-SPAM's gradient transform (AdaClip, AdaGN) in front of any optimizer is
:class:`StableSPAMClip`.

A call that raises (a read-only gradient, two gradients sharing memory, a
shape mismatch, ``nonfinite="error"``) writes no gradient and leaves the
clipper as it was: statistics, ``step`` and the ``last_*`` attributes.
"""

from __future__ import annotations

# ``fastclip.adaptive.NonFiniteNormError`` could be imported before this module
# became a package; it is ``fastclip.NonFiniteNormError``.
from .._errors import NonFiniteNormError as NonFiniteNormError
from ._adagc import AdaGC
from ._agc import AGC
from ._autoclip import AutoClip, _Percentile
from ._global import GlobalNormClipper
from ._quantile import QuantileClip
from ._spike import spike_clip, spike_clip_
from ._stable_spam import StableSPAMClip, stable_spam_scale
from ._zclip import ZClip

__all__ = [
    "AGC",
    "AdaGC",
    "AutoClip",
    "GlobalNormClipper",
    "QuantileClip",
    "StableSPAMClip",
    "ZClip",
    "spike_clip",
    "spike_clip_",
    "stable_spam_scale",
]

# The public path, in reprs, docs and pickles, is ``fastclip.adaptive.<name>`` (as
# torch sets ``clip_grad_norm_.__module__ = "torch.nn.utils"``).  ``_Percentile``
# too: an AutoClip's statistics are one, so every pickled AutoClip names
# ``fastclip.adaptive._Percentile`` (tests/api/test_adaptive.py loads such pickles).
for _cls in (
    AGC, AdaGC, AutoClip, GlobalNormClipper, QuantileClip, StableSPAMClip, ZClip, _Percentile
):  # fmt: skip
    _cls.__module__ = __name__
del _cls
spike_clip.__module__ = spike_clip_.__module__ = __name__
