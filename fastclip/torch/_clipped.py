"""``ClippedOptimizer``: any ``torch.optim.Optimizer`` whose every step clips first.

Re-exported by ``fastclip.torch``.  Importing this module imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from fastclip._errors import public_method

from . import _ops

__all__ = ["ClippedOptimizer"]


class ClippedOptimizer(Optimizer):
    r"""Wrap any ``torch.optim.Optimizer`` so that every ``step()`` clips first.

    ``step()`` calls ``clipper(grads, params)`` on the gradients of all
    parameters that have one (under ``torch.no_grad()``), then the wrapped
    optimizer's ``step()``.  ``clipper`` is any callable with that signature:
    a :mod:`fastclip.adaptive` clipper (``GlobalNormClipper``, ``AutoClip``,
    ``ZClip``, ``AGC``) or your own.

    ``param_groups``, ``state`` and ``defaults`` *are* the wrapped optimizer's
    (shared objects), so learning-rate schedulers and ``zero_grad`` act on it.
    ``state_dict()`` holds both the optimizer's and the clipper's state.

    With ``torch.amp.GradScaler`` call ``scaler.step(clipped)``: the scaler
    unscales the gradients first, then skips the whole step (clipper
    included, so its statistics never see the bad step) when it finds inf or
    NaN, exactly as it does for a plain optimizer.

    Attributes
    ----------
    last_total_norm : the clipper's return value of the last step.

    Examples
    --------
    >>> import torch
    >>> from fastclip.adaptive import ZClip
    >>> from fastclip.torch import ClippedOptimizer
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ZClip())
    >>> model(torch.ones(2, 4)).sum().backward()
    >>> opt.step()
    >>> opt.clipper.state_dict()["step"]
    1
    """

    @public_method("__init__", tracing=torch.compiler.is_compiling)
    def __init__(self, optimizer: Optimizer, clipper: Callable[..., Any]) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer (e.g. torch.optim.AdamW(params)), "
                f"got {type(optimizer).__module__}.{type(optimizer).__qualname__}"
            )
        if not callable(clipper):
            raise TypeError("clipper must be callable as clipper(grads, params)")
        super().__init__([torch.zeros(0)], {})  # hooks and bookkeeping; groups replaced below
        self.optimizer = optimizer
        self.clipper = clipper
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self.last_total_norm: Any = None
        self._handle = _ops.register(self)

    def _params_and_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params, grads = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
        return params, grads

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` (if any), clip every gradient, then step the wrapped optimizer."""
        if torch.compiler.is_compiling():  # Dynamo cannot trace numba: a custom op
            return self._traced_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads = self._params_and_grads()
        if grads:
            self.last_total_norm = self.clipper(grads, params)
        if getattr(self.clipper, "last_step_skipped", False):
            return loss
        self.optimizer.step()
        return loss

    def _traced_step(self, closure: Callable[[], Any] | None) -> Any:
        """``step()`` while Dynamo traces it: the clipper runs inside the
        ``fastclip::clipper_call_`` operator, the wrapped optimizer's step is
        traced as torch traces it.

        Only a clipper that can skip a step (``nonfinite="skip"``, or one with
        ``last_step_skipped`` and no ``nonfinite``) makes the decision a host
        read, hence one graph break (``fullgraph=True`` refuses it).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads = self._params_and_grads()
        clipper = self.clipper
        if grads:
            skipped = _ops.clipper_call(self._handle, grads, params)
            if hasattr(clipper, "last_step_skipped") and (
                getattr(clipper, "nonfinite", "skip") == "skip"
            ):
                if bool(skipped):  # data-dependent: Dynamo breaks the graph here
                    return loss
        elif getattr(clipper, "last_step_skipped", False):  # as eager: the last call's
            return loss
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "optimizer", None) is None:  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"optimizer": wrapped.state_dict(), "clipper": clipper.state_dict()}``."""
        sd: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if hasattr(self.clipper, "state_dict"):
            sd["clipper"] = self.clipper.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if "clipper" in state_dict and hasattr(self.clipper, "load_state_dict"):
            self.clipper.load_state_dict(state_dict["clipper"])
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def __repr__(self) -> str:
        return f"ClippedOptimizer({self.optimizer!r}, clipper={self.clipper!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handle = _ops.register(self)  # a copy or an unpickled optimizer: its own


ClippedOptimizer.__module__ = "fastclip.torch"  # the public path: reprs, docs and pickles name it
