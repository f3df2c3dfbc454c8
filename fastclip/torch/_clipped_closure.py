"""``ClippedOptimizer``'s step around an optimizer that evaluates the closure
itself (``torch.optim.LBFGS``: several evaluations per step): every evaluation
is clipped, and a failure or a skip at any evaluation undoes the whole step.

Used by ``_clipped.py`` only.  Importing this module imports torch.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from . import _clipped_restore as _restore

__all__ = ["closure_step", "needs_closure"]


class _Skipped(Exception):
    """Raised out of a forwarded closure when the clipper skips: stops the inner step."""


def needs_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` has a ``closure`` parameter without a default
    (``torch.optim.LBFGS``: it evaluates the closure several times per step)."""
    try:
        parameter = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def closure_step(opt: Any, closure: Callable[[], Any]) -> Any:
    """``opt.step(closure)`` (``opt`` a ``ClippedOptimizer``) when the wrapped
    optimizer evaluates the closure itself (LBFGS), under ``torch.no_grad()``."""
    params = [p for group in opt.param_groups for p in group["params"]]
    saved = (
        _restore.clipper_snapshot(opt.clipper),
        [p.detach().clone() for p in params],
        _restore.grads_of(params),
        {k: copy.deepcopy(v) for k, v in opt.state.items()},  # the params: keys
        opt.last_total_norm,
    )
    first: list[Any] = []

    def clipped() -> Any:
        with torch.enable_grad():
            loss = closure()
        if not first:
            first.append(loss)
        ps, gs = opt._params_and_grads()
        if gs:
            opt.last_total_norm = opt.clipper(gs, ps)
            if getattr(opt.clipper, "last_step_skipped", False):
                raise _Skipped
        return loss

    try:
        return opt.optimizer.step(clipped)
    except BaseException as exc:
        skipped = isinstance(exc, _Skipped)
        last = {k: getattr(opt.clipper, k, None) for k in ("last_total_norm", "last_threshold")}
        norm = opt.last_total_norm
        _restore.clipper_restore(opt.clipper, saved[0])
        for p, value in zip(params, saved[1]):
            p.copy_(value)
        _restore.put_grads(params, saved[2])
        opt.state.clear()
        opt.state.update(saved[3])
        opt.last_total_norm = saved[4]
        if not skipped:
            raise
        for key, value in last.items():  # the skip is this step's outcome
            setattr(opt.clipper, key, value)
        opt.clipper.last_step_skipped = True  # type: ignore[attr-defined]
        opt.last_total_norm = norm
        return first[0] if first else None
