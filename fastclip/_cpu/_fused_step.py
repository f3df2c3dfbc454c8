"""The fused clip-and-step flows of the CPU route (``fastclip.optim`` and the
``fastclip.torch`` fused optimizers).

A step is three phases, so that nothing is written before everything is
checked: ``prepare_*`` validates and packs every list (per-dtype groups,
shapes, writability, overlaps), ``clip_plan`` takes the global norm with the
core's kernel and decides the coefficient (or the skip), and ``run_*``
launches one fused kernel per dtype.  ``adamw_step_`` / ``sgd_step_`` are the
three phases in order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _config as cfg
from .._errors import NonFiniteNormError, nonfinite_step_message
from .._formulas import clip_coefficient
from .._typing import StepClip
from .._validate import clip_mode, norm_args, scalar_value
from . import _optim
from ._launch import run


class Clip:
    """The clip part of a fused step: coefficient, norm and whether to skip."""

    __slots__ = ("coef", "norm", "norm_dtype", "skip")

    def __init__(self) -> None:
        self.coef = 1.0
        self.norm: float | None = None
        self.norm_dtype: Any = np.dtype(np.float32)
        self.skip = False


def clip_plan(lib: Any, grads: list[Any], clip: StepClip, what: str) -> Clip:
    """Compute the norm (one read pass, the core's kernel) and the coefficient.

    Raises :class:`fastclip.NonFiniteNormError` for ``nonfinite="error"`` and a
    non-finite norm; sets ``skip`` for ``"skip"``.  Nothing is written here.
    """
    max_norm, norm_type, total_norm, clip_coef, eps, nonfinite = clip.args()
    plan = Clip()
    mode = clip_mode(max_norm, total_norm, clip_coef, what)
    if mode == "coef":
        plan.coef = scalar_value(clip_coef, "clip_coef")
        if not plan.coef >= 0.0:
            if nonfinite == "error":
                raise NonFiniteNormError(f"{what}: the clip coefficient is {plan.coef}")
            if nonfinite == "skip":
                plan.skip = True
        return plan
    if mode == "none":
        return plan
    c, ord_code, p, eps_v = norm_args(max_norm, norm_type, eps)
    if total_norm is None:
        # The core's norm (robust_norm): one power-sum pass, plus a rescaled pass
        # only when the float64 sum left its exact range (|g| ~ 1e200 or 1e-200),
        # so the fused steps clip with the norm the core functions return.
        value, plan.norm_dtype = _optim.global_norm_and_dtype(lib, grads, ord_code, p)
    else:
        value = scalar_value(total_norm, "total_norm")
        plan.norm_dtype = (
            np.dtype(np.float64)
            if any(str(g.dtype).endswith("float64") for g in grads)
            else np.dtype(np.float32)
        )
    plan.norm = value
    if not math.isfinite(value):
        if nonfinite == "error":
            raise NonFiniteNormError(nonfinite_step_message(what, value))
        if nonfinite == "skip":
            plan.skip = True
            return plan
    plan.coef = clip_coefficient(c, value, eps_v)
    return plan


def norm_result(lib: Any, plan: Clip, like: Any) -> Any:
    if plan.norm is None:
        return None
    return lib.wrap(plan.norm, plan.norm_dtype, like)


def prepare_adamw(
    lib: Any,
    params: list[Any],
    grads: list[Any],
    exp_avgs: list[Any],
    exp_avg_sqs: list[Any],
    max_exp_avg_sqs: list[Any] | None,
) -> list[Any]:
    """Validate and pack an AdamW launch (per-dtype groups); writes nothing."""
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
    return _optim.groups(lib, lists, [True, False, True, True, True], "adamw_step")


def run_adamw(
    lib: Any, params: list[Any], gs: list[Any], hparams: np.ndarray, coef: float, amsgrad: bool
) -> None:
    """Run the AdamW kernel on groups from :func:`prepare_adamw` (one launch per dtype)."""
    for g in gs:
        rows = hparams if len(g.index) == len(params) else hparams[g.index]
        run(
            "tab_adamw",
            g.n,
            g.addrs(0),
            g.addrs(1),
            g.addrs(2),
            g.addrs(3),
            g.addrs(4),
            g.sizes,
            g.like,
            coef,
            rows,
            amsgrad,
            cfg.CHUNK,
        )
        g.copy_out()
    lib.touched(params)


def prepare_sgd(
    lib: Any, params: list[Any], grads: list[Any], buffers: list[Any] | None
) -> list[Any]:
    """Validate and pack an SGD launch (per-dtype groups); writes nothing."""
    return _optim.groups(lib, [params, grads, buffers], [True, False, True], "sgd_step")


def run_sgd(lib: Any, params: list[Any], gs: list[Any], hparams: np.ndarray, coef: float) -> None:
    """Run the SGD kernel on groups from :func:`prepare_sgd` (one launch per dtype)."""
    for g in gs:
        rows = hparams if len(g.index) == len(params) else hparams[g.index]
        run(
            "tab_sgd",
            g.n,
            g.addrs(0),
            g.addrs(1),
            g.addrs(2),
            g.sizes,
            g.like,
            coef,
            rows,
            cfg.CHUNK,
        )
        g.copy_out()
    lib.touched(params)


def adamw_step_(
    lib: Any,
    ps: list[Any],
    gs: list[Any],
    ms: list[Any],
    vs: list[Any],
    xs: list[Any] | None,
    hparams: np.ndarray,
    maximize: bool,
    clip: StepClip,
) -> Any:
    """One fused AdamW step; the 0-d norm before clipping (None without ``max_norm``)."""
    # every list is validated (shapes, dtypes, writability, overlaps) before the
    # norm decides anything: a NaN norm with "skip" must not hide a bad call
    groups = prepare_adamw(lib, ps, gs, ms, vs, xs)
    plan = clip_plan(lib, gs, clip, "adamw_step_")
    if not plan.skip:
        coef = -plan.coef if maximize else plan.coef
        run_adamw(lib, ps, groups, hparams, coef, xs is not None)
    return norm_result(lib, plan, ps[0])


def sgd_step_(
    lib: Any,
    ps: list[Any],
    gs: list[Any],
    bufs: list[Any] | None,
    hparams: np.ndarray,
    maximize: bool,
    clip: StepClip,
) -> Any:
    """One fused SGD step; the 0-d norm before clipping (None without ``max_norm``)."""
    groups = prepare_sgd(lib, ps, gs, bufs)  # validate everything before the skip decision
    plan = clip_plan(lib, gs, clip, "sgd_step_")
    if not plan.skip:
        coef = -plan.coef if maximize else plan.coef
        run_sgd(lib, ps, groups, hparams, coef)
    return norm_result(lib, plan, ps[0])


# The phases, for optimizers that keep their own state (fastclip.torch.FusedAdamW,
# FusedSGD): the same names on the GPU route (_gpu/_fused_step.py).


def step_plan(lib: Any, grads: list[Any], clip: StepClip, what: str) -> Clip:
    """The norm and coefficient of one step (a host ``Clip``); nothing is written."""
    return clip_plan(lib, grads, clip, what)


def step_prepare(lib: Any, lists: list[Any], amsgrad: bool | None, what: str) -> Any:
    """Validate and pack one launch: AdamW (``amsgrad`` a bool) or SGD (None)."""
    if amsgrad is None:
        return prepare_sgd(lib, *lists)
    return prepare_adamw(lib, *lists)


def step_run(
    lib: Any,
    prepared: Any,
    lists: list[Any],
    hparams: np.ndarray,
    plan: Clip,
    sign: float,
    amsgrad: bool | None,
) -> None:
    """Launch a prepared step (one fused launch per dtype)."""
    if amsgrad is None:
        run_sgd(lib, lists[0], prepared, hparams, sign * plan.coef)
    else:
        run_adamw(lib, lists[0], prepared, hparams, sign * plan.coef, bool(amsgrad))
