"""Functional fused clip-and-step optimizers on lists of arrays.

Validation of every argument here, then one call to the backend of
``_dispatch.backend_for_step``: NumPy arrays and torch CPU tensors run the
Numba kernels (``_cpu/_fused_step.py``); CuPy arrays and torch CUDA tensors run
the CUDA kernels of ``_gpu/optim_kernels.cu`` (``_gpu/_fused_step.py``),
zero-copy, on the caller's stream, without host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _dispatch
from .._errors import public
from .._hparams import adamw_hparams, sgd_hparams
from .._typing import StepClip
from .._validate import check_nonfinite, scalar_value


def _as_list(arrays: Any, name: str) -> list[Any]:
    if arrays is None:
        raise TypeError(f"{name} is required")
    return _dispatch.as_array_list(arrays, name)


def _step_clip(
    backend: Any,
    max_norm: Any,
    norm_type: Any,
    total_norm: Any,
    clip_coef: Any,
    eps: Any,
    policy: str,
) -> StepClip:
    """The clip arguments; on the GPU route a device ``total_norm`` / ``clip_coef``
    stays on the device (no sync); the CPU route reads them as Python floats."""
    if backend.on_gpu:
        total_norm = backend.step_scalar(total_norm, "total_norm")
        clip_coef = backend.step_scalar(clip_coef, "clip_coef")
    return StepClip(max_norm, norm_type, total_norm, clip_coef, eps, policy)


def _steps(step: Any, n: int) -> list[float]:
    if isinstance(step, (int, float, np.integer, np.floating)) and not isinstance(step, bool):
        steps = [float(step)] * n
    elif getattr(step, "shape", None) == ():  # a 0-d array or tensor
        steps = [scalar_value(step, "step")] * n
    else:
        if isinstance(step, (str, bytes)) or not hasattr(step, "__iter__"):
            raise TypeError(f"step must be an int or one int per parameter, got {step!r}")
        steps = [scalar_value(s, "step") for s in step]
        if len(steps) != n:
            raise ValueError(f"step: got {len(steps)} values for {n} parameters")
    if any(not s >= 1 for s in steps):
        raise ValueError("step counts must be >= 1 (the count *after* this step, as torch)")
    return steps


def _betas(betas: Any) -> tuple[float, float]:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair of real numbers, got {betas!r}") from None
    return scalar_value(b1, "betas[0]"), scalar_value(b2, "betas[1]")


def check_adamw_args(lr: float, beta1: float, beta2: float, eps: float, wd: float) -> None:
    """``torch.optim.AdamW``'s argument rules and messages (NaN fails every one).

    beta1 = 1 would divide by ``1 - beta1**step = 0`` and beta2 = 1 freeze the
    second moment at its initial zeros: torch refuses both, and so do we.
    """
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= wd:
        raise ValueError(f"Invalid weight_decay value: {wd}")


def check_sgd_args(lr: float, momentum: float, dampening: float, wd: float, nesterov: bool) -> None:
    """``torch.optim.SGD``'s argument rules and messages."""
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if wd < 0.0:
        raise ValueError(f"Invalid weight_decay value: {wd}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


@public("fastclip.optim.adamw_step_")
def adamw_step_(
    params: Any,
    grads: Any,
    exp_avgs: Any,
    exp_avg_sqs: Any,
    *,
    step: int | Sequence[int],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    max_exp_avg_sqs: Any = None,
    maximize: bool = False,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    total_norm: Any = None,
    clip_coef: Any = None,
    clip_eps: float = 1e-6,
    nonfinite: str = "propagate",
) -> Any:
    r"""One AdamW step on lists of arrays, in place, with global-norm clipping fused in.

    With :math:`c = \min(1, \mathrm{max\_norm} / (\|g\|_2 + 10^{-6}))` the clip
    coefficient (1 without ``max_norm``) and :math:`t` = ``step``, every element
    is updated as ``torch.optim.AdamW`` (Loshchilov & Hutter 2019) does after
    ``torch.nn.utils.clip_grad_norm_``:

    .. math::

        \hat g &= c\, g \quad (-c\, g \text{ with maximize}) \\
        p &\leftarrow p\,(1 - \eta\lambda) \\
        m &\leftarrow m + (1-\beta_1)(\hat g - m) \\
        v &\leftarrow \beta_2 v + (1-\beta_2)\,\hat g^2 \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t}\,
             \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    (with ``max_exp_avg_sqs``, AMSGrad: :math:`\hat v = \max(\hat v, v)` replaces
    :math:`v` in the denominator).  The gradients are read twice (norm, then
    the fused update) and never written: they stay unclipped.

    Parameters
    ----------
    params, grads, exp_avgs, exp_avg_sqs : lists of arrays
        NumPy arrays or torch CPU tensors (Numba kernels), or CuPy arrays or
        torch CUDA tensors, all on one device (CUDA kernels), element ``i`` of
        each list with the shape and dtype of ``params[i]`` (float16, bfloat16,
        float32, float64).  ``params`` and the state lists are updated in place.
    step : int or sequence of int
        The step count *after* this step (1 on the first call), for the bias
        corrections; one per parameter if they differ.
    lr, betas, eps, weight_decay : float
        As ``torch.optim.AdamW`` (defaults identical).
    max_exp_avg_sqs : list of arrays, optional
        AMSGrad state; its presence turns AMSGrad on.
    maximize : bool, default False
        Ascend instead of descend (the gradient's sign is flipped).
    max_norm : float, optional
        Clip the gradients' global ``norm_type``-norm to ``max_norm`` inside the
        update (``torch.nn.utils.clip_grad_norm_``'s formula, ``eps = clip_eps``).
    norm_type : float, default 2
        Any ``p > 0`` or ``inf``.
    total_norm : float or 0-d array, optional
        Use this norm instead of computing it (e.g. one reduced across ranks).
        On the GPU a 0-d device array of the arrays' library stays on the device.
    clip_coef : float or 0-d array, optional
        Multiply the gradients by this coefficient instead (e.g. from a
        :mod:`fastclip.adaptive` clipper); excludes ``max_norm``.  On the GPU a
        0-d device array stays on the device.
    clip_eps : float, default 1e-6
        Added to the norm in the coefficient's denominator.
    nonfinite : {"propagate", "error", "skip"}
        A NaN/inf norm: scale by the non-finite coefficient as torch does
        (parameters become NaN), raise :class:`fastclip.NonFiniteNormError`
        before any write, or leave every array untouched.  Only the clipping
        norm (or a NaN/negative ``clip_coef``) counts: without ``max_norm`` or
        ``clip_coef`` nothing is checked, and non-finite gradients step as in
        torch.optim.

    Returns
    -------
    array or None
        The 0-d global gradient norm before clipping (``max_norm`` given), in
        the arrays' library and on their device; None otherwise.

    Notes
    -----
    float32 results agree with ``torch.optim.AdamW`` (single-tensor code) to a
    few ulps per step; 16-bit data is computed in float32 and rounded once
    per stored value (torch rounds after every operation).

    GPU route (CuPy arrays, torch CUDA tensors): one norm pass (the core's
    multi-tensor norm kernels, which leave the norm and the coefficient in
    device memory) and one fused kernel launch per dtype, on torch's current
    stream (CuPy's for CuPy arrays), with the same formulas, operation by
    operation, as the CPU kernels.  The host never waits for the device,
    except with ``nonfinite="error"``, which reads the norm (or a device
    ``clip_coef``) back to raise before any write: one synchronisation.
    ``nonfinite="skip"`` is decided by the kernel, which reads the device norm
    and writes nothing when it is non-finite; the call cannot tell whether
    the step was skipped without reading the returned norm (your step count
    is yours to hold back).  A float32 norm beyond float32's range counts as
    non-finite there.  The GPU norm is the core's GPU norm, the root of the
    raw float64 power sum: an L2 norm above about 1.3e154 is inf there (and
    one below about 1e-154 loses precision), where the CPU route rescales by
    the largest element as the core's CPU functions do.

    References
    ----------
    Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
    https://arxiv.org/abs/1711.05101

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.optim import adamw_step_
    >>> p = [np.ones(3, np.float32)]
    >>> g = [np.array([3.0, 4.0, 0.0], np.float32)]
    >>> m, v = [np.zeros(3, np.float32)], [np.zeros(3, np.float32)]
    >>> adamw_step_(p, g, m, v, step=1, lr=0.1, weight_decay=0.0, max_norm=1.0)
    array(5., dtype=float32)
    >>> p[0]
    array([0.9, 0.9, 1. ], dtype=float32)
    """
    ps = _as_list(params, "params")
    if not ps:
        return None
    gs = _as_list(grads, "grads")
    ms = _as_list(exp_avgs, "exp_avgs")
    vs = _as_list(exp_avg_sqs, "exp_avg_sqs")
    xs = None if max_exp_avg_sqs is None else _as_list(max_exp_avg_sqs, "max_exp_avg_sqs")
    policy = check_nonfinite(nonfinite)
    backend = _dispatch.backend_for_step([ps, gs, ms, vs, xs], "adamw_step_")
    if len(gs) != len(ps):
        raise ValueError(f"grads has {len(gs)} arrays for {len(ps)} params")
    beta1, beta2 = _betas(betas)
    lr_v, eps_v, wd_v = (
        scalar_value(lr, "lr"),
        scalar_value(eps, "eps"),
        scalar_value(weight_decay, "weight_decay"),
    )
    check_adamw_args(lr_v, beta1, beta2, eps_v, wd_v)
    hparams = adamw_hparams(_steps(step, len(ps)), lr_v, beta1, beta2, eps_v, wd_v)
    clip = _step_clip(backend, max_norm, norm_type, total_norm, clip_coef, clip_eps, policy)
    # every list is validated (shapes, dtypes, writability, overlaps) before the
    # norm decides anything: a NaN norm with "skip" must not hide a bad call
    return backend.adamw_step_(
        ps, gs, ms, vs, xs, hparams=hparams, maximize=bool(maximize), clip=clip
    )


@public("fastclip.optim.sgd_step_")
def sgd_step_(
    params: Any,
    grads: Any,
    momentum_buffers: Any = None,
    *,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool | Sequence[bool] = False,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    total_norm: Any = None,
    clip_coef: Any = None,
    clip_eps: float = 1e-6,
    nonfinite: str = "propagate",
) -> Any:
    r"""One SGD step on lists of arrays, in place, with global-norm clipping fused in.

    Exactly ``torch.optim.SGD`` after ``clip_grad_norm_``, element by element,
    with :math:`c` the clip coefficient (see :func:`adamw_step_`):

    .. math::

        \hat g &= c\,g + \lambda p \quad (-c\,g + \lambda p \text{ with maximize}) \\
        b &\leftarrow \hat g \ \text{(first step)}, \quad
             b \leftarrow \mu b + (1-\tau)\,\hat g \ \text{(later)} \\
        \hat g &\leftarrow \hat g + \mu b \ \text{(Nesterov)}, \quad \hat g \leftarrow b
             \ \text{(otherwise; no momentum: } \hat g \text{ as is)} \\
        p &\leftarrow p - \eta\,\hat g

    Parameters
    ----------
    params, grads : lists of arrays
        NumPy arrays or torch CPU tensors, or CuPy arrays or torch CUDA
        tensors on one device (see :func:`adamw_step_` for the GPU route, its
        no-sync guarantee and its exception); ``params`` are updated in place.
    momentum_buffers : list of arrays, optional
        Required when ``momentum != 0``; written in place.  On the first step
        (``first_step=True``, or per parameter) the buffer is *set* to the
        gradient, as torch does when its buffer is still ``None``; its old
        content is ignored (``np.empty`` is fine).  On the GPU with
        ``nonfinite="skip"``, a skipped first step leaves the buffer unset:
        pass ``first_step=True`` again next time.
    lr, momentum, dampening, weight_decay, nesterov, maximize :
        As ``torch.optim.SGD`` (Nesterov needs momentum > 0 and dampening 0).
    max_norm, norm_type, total_norm, clip_coef, clip_eps, nonfinite :
        As :func:`adamw_step_`.

    Returns
    -------
    array or None
        The 0-d global gradient norm before clipping when ``max_norm`` is
        given (on the arrays' device).

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.optim import sgd_step_
    >>> p, g = [np.zeros(2, np.float32)], [np.array([3.0, 4.0], np.float32)]
    >>> sgd_step_(p, g, lr=1.0, max_norm=1.0, clip_eps=0.0)
    array(5., dtype=float32)
    >>> p[0]
    array([-0.6, -0.8], dtype=float32)
    """
    ps = _as_list(params, "params")
    if not ps:
        return None
    gs = _as_list(grads, "grads")
    policy = check_nonfinite(nonfinite)
    momentum, dampening = scalar_value(momentum, "momentum"), scalar_value(dampening, "dampening")
    bufs = None
    if momentum != 0 and momentum_buffers is not None:
        bufs = _as_list(momentum_buffers, "momentum_buffers")
    backend = _dispatch.backend_for_step([ps, gs, bufs], "sgd_step_")
    if len(gs) != len(ps):
        raise ValueError(f"grads has {len(gs)} arrays for {len(ps)} params")
    lr_v, wd_v = scalar_value(lr, "lr"), scalar_value(weight_decay, "weight_decay")
    check_sgd_args(lr_v, momentum, dampening, wd_v, bool(nesterov))
    if momentum != 0 and bufs is None:
        raise ValueError(
            "momentum != 0 needs momentum_buffers (a list of zero arrays like params, "
            "with first_step=True on the first step)"
        )
    if isinstance(first_step, (bool, np.bool_)):
        first = [bool(first_step)] * len(ps)
    else:
        first = [bool(f) for f in first_step]
    if len(first) != len(ps):
        raise ValueError(f"first_step: got {len(first)} values for {len(ps)} parameters")
    hparams = sgd_hparams(len(ps), lr_v, momentum, dampening, wd_v, bool(nesterov), first)
    clip = _step_clip(backend, max_norm, norm_type, total_norm, clip_coef, clip_eps, policy)
    return backend.sgd_step_(ps, gs, bufs, hparams=hparams, maximize=bool(maximize), clip=clip)
