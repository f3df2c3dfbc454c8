"""``ClippedOptimizer``: any ``torch.optim.Optimizer`` whose every step clips first.

Re-exported by ``fastclip.torch``.  Importing this module imports torch.  The
checkpoint layout is in ``_clipped_state.py``, the copies a failed step puts
back in ``_clipped_restore.py``, the step of an optimizer that evaluates the
closure itself (LBFGS) in ``_clipped_closure.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from fastclip._errors import public_method

from . import _clipped_closure as _closure
from . import _clipped_restore as _restore
from . import _clipped_state as _layout
from . import _ops

__all__ = ["ClippedOptimizer"]


class ClippedOptimizer(Optimizer):
    r"""Wrap any ``torch.optim.Optimizer`` so that every ``step()`` clips first.

    ``step()`` calls ``clipper(grads, params)`` on the gradients of all
    parameters that have one (under ``torch.no_grad()``), then the wrapped
    optimizer's ``step()``.  ``clipper`` is any callable with that signature:
    a :mod:`fastclip.adaptive` clipper (``GlobalNormClipper``, ``AutoClip``,
    ``ZClip``, ``AGC``) or your own.  With a clipper whose threshold is never
    reached, every step is the wrapped optimizer's own, bit for bit.

    ``param_groups``, ``state`` and ``defaults`` are properties that read (and
    assign) the wrapped optimizer's, so learning-rate schedulers,
    ``zero_grad``, ``add_param_group`` and ``opt.optimizer.load_state_dict``
    act on the optimizer that steps, and the wrapper never goes out of sync.

    **Closures.**  When the wrapped ``step`` takes ``closure=None`` (every
    ``torch.optim`` optimizer but LBFGS), ``step(closure)`` calls the closure
    once under ``torch.enable_grad()``, clips the gradients it produced, steps
    the wrapped optimizer (without the closure) and returns the closure's
    loss.  When the wrapped ``step`` requires a closure (``torch.optim.LBFGS``
    evaluates it several times per step), the wrapper forwards a closure that
    calls yours and then clips the gradients it produced: every gradient the
    optimizer sees is clipped, and the clipper is called once per evaluation
    (its step counter and statistics count evaluations).

    **Failures.**  When the wrapped step raises (for example
    ``torch.optim.Adam(..., capturable=True)`` on CPU tensors), the original
    exception is re-raised after the gradients (the same tensor objects) and
    the clipper are put back as they were before ``step()``, so a retry sees
    the same gradients and statistics, and the state entries the failed step
    created are dropped (torch's Adam creates them before its checks).  That
    costs a copy of the gradients and of the clipper's attributes per step (a
    fastclip clipper's lists are copied, not deep-copied; a user's clipper's
    ``__dict__`` is deep-copied): the gradients are copied into buffers kept
    between steps (memory: one more copy of the gradients), 1.14x the time of
    ``clip_grad_norm_`` + an AdamW step of 4M float32 values
    (``python benchmarks/bench_clipped_optimizer.py``, one thread, one run on
    a shared machine), and O(history) for ``AutoClip`` (about 4 ms at 50,000
    norms).  ``restore_on_error=False`` skips those copies: a failed step then
    leaves the gradients clipped and the clipper updated (the state entries it
    created are still dropped).  State that existed before and the
    parameters are as the failed step left them (torch's optimizers check
    before they write).  With a closure-requiring optimizer the parameters
    and the whole state are copied and put back, and a skip
    (``nonfinite="skip"``) at any evaluation undoes the whole step.

    **Compiled steps.**  Under ``torch.compile`` (``torch.compile(opt.step)``,
    or a compiled training step that calls ``opt.step()``) nothing is copied
    and a failed step is not undone, whatever ``restore_on_error`` says: the
    clipper runs in the ``fastclip::clipper_call_`` operator of a compiled
    graph, then the wrapped step.  When the wrapped step fails after that
    graph ran (it breaks the graph first, as every ``torch.optim`` step does,
    or it raises inside a compiled graph), the step leaves what an eager step
    with ``restore_on_error=False`` leaves: the gradients clipped, the clipper
    updated, ``last_total_norm`` set, the parameters and the state as the
    failed step left them, and, unlike the eager step, the state entries it
    created are kept.  When the wrapped step raises while Dynamo traces it,
    before any graph ran, Dynamo gives up on the frame and runs ``step()``'s
    own code, which takes the eager path: the eager restore applies.  Copies
    would slow every successful compiled step (1.32x and 1.62x a compiled
    AdamW step of 16M float32: ``python benchmarks/bench_clipped_optimizer.py
    --compiled --numel 16000000 --rounds 25``, two runs, busy machine), and an
    error raised inside a compiled graph reaches no ``except`` unless the
    graph breaks around the wrapped step.

    **Checkpoints.**  ``state_dict()`` is the wrapped optimizer's
    ``state_dict()`` (torch's layout: ``"state"``, ``"param_groups"``) plus a
    top-level ``"fastclip_clipper"`` key with ``clipper.state_dict()`` (when
    the clipper has one).  ``load_state_dict`` also takes the earlier layout
    ``{"optimizer": ..., "clipper": ...}``.  It checks the clipper's part
    first (on a copy of the clipper) and then loads the optimizer; a refused
    load leaves the wrapper, the optimizer and the clipper as they were.  A
    plain optimizer's state dict (no clipper part) is refused with a
    ValueError: load it with ``opt.optimizer.load_state_dict(sd)``.  A plain
    optimizer loads the wrapper's state dict and ignores the clipper's part.
    ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` keeps only
    ``"state"`` and ``"param_groups"``, and calls ``step()`` with zero
    gradients on an optimizer without state; pass it ``opt.optimizer`` (and
    ``set_optimizer_state_dict`` too) and save ``opt.clipper.state_dict()``
    as an entry of its own.

    With ``torch.amp.GradScaler`` call ``scaler.step(clipped)`` (and
    ``scaler.unscale_(clipped)``, never the inner optimizer): the scaler
    unscales the gradients first, then skips the whole step (clipper
    included, so its statistics never see the bad step) when it finds inf or
    NaN, exactly as it does for a plain optimizer.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer that steps.
    clipper : callable
        ``clipper(grads, params)``, called on the gradients before every step.
    restore_on_error : bool, default True
        Put the gradients and the clipper back when the wrapped step raises
        (see **Failures**); False skips the per-step copies this needs.

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
    >>> sorted(opt.state_dict())
    ['fastclip_clipper', 'param_groups', 'state']
    >>> opt.param_groups is opt.optimizer.param_groups
    True
    """

    @public_method("__init__", tracing=torch.compiler.is_compiling)
    def __init__(
        self, optimizer: Optimizer, clipper: Callable[..., Any], *, restore_on_error: bool = True
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer (e.g. torch.optim.AdamW(params)), "
                f"got {type(optimizer).__module__}.{type(optimizer).__qualname__}"
            )
        if not callable(clipper):
            raise TypeError("clipper must be callable as clipper(grads, params)")
        if not isinstance(restore_on_error, bool):
            raise TypeError(f"restore_on_error must be True or False, got {restore_on_error!r}")
        # torch's __init__ sets up the hooks and bookkeeping; the groups, state and
        # defaults it assigns go to a scratch slot (the properties below) and are dropped.
        super().__init__([torch.zeros(0)], {})
        self.__dict__.pop("_scratch", None)
        self.optimizer = optimizer
        self.clipper = clipper
        self.last_total_norm: Any = None
        self.restore_on_error = restore_on_error
        self._handle = _ops.register(self)

    # -- the wrapped optimizer's attributes, read through (torch's base assigns them)

    def _inner(self) -> Optimizer | None:
        return self.__dict__.get("optimizer")

    def _get(self, name: str) -> Any:
        inner = self._inner()
        return getattr(inner, name) if inner is not None else self.__dict__["_scratch"][name]

    def _set(self, name: str, value: Any) -> None:
        inner = self._inner()
        if inner is None:  # during Optimizer.__init__
            self.__dict__.setdefault("_scratch", {})[name] = value
        else:
            setattr(inner, name, value)

    param_groups = property(  # type: ignore[assignment]
        lambda self: self._get("param_groups"),
        lambda self, v: self._set("param_groups", v),
        doc="The wrapped optimizer's ``param_groups`` (the same list).",
    )
    state = property(  # type: ignore[assignment]
        lambda self: self._get("state"),
        lambda self, v: self._set("state", v),
        doc="The wrapped optimizer's ``state`` (the same dict).",
    )
    defaults = property(  # type: ignore[assignment]
        lambda self: self._get("defaults"),
        lambda self, v: self._set("defaults", v),
        doc="The wrapped optimizer's ``defaults`` (the same dict).",
    )

    def _params_and_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params, grads = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
        return params, grads

    def _clipper_snapshot(self) -> Any:
        return _restore.clipper_snapshot(self.clipper)

    def _clipper_restore(self, snapshot: Any) -> None:
        _restore.clipper_restore(self.clipper, snapshot)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Clip every gradient, then step the wrapped optimizer (see the class
        docstring for closures and for what a failed step leaves)."""
        if torch.compiler.is_compiling():  # Dynamo cannot trace numba: a custom op
            return self._traced_step(closure)
        if closure is not None and _closure.needs_closure(self.optimizer):
            return _closure.closure_step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads = self._params_and_grads()
        if not grads:
            if getattr(self.clipper, "last_step_skipped", False):
                return loss
            self.optimizer.step()
            return loss
        restore = self.restore_on_error
        saved_clipper = self._clipper_snapshot() if restore else None
        saved_grads: list[torch.Tensor] = []
        if restore:  # buffers kept between steps (see _clipped_restore.copy_into)
            saved_grads = _restore.copy_into(self.__dict__.get("_grad_backup"), grads)
            self.__dict__["_grad_backup"] = saved_grads
        saved_norm = self.last_total_norm
        # torch's optimizers create a parameter's state before their checks run
        # (Adam(capturable=True) on CPU tensors raises after its _init_group): what
        # a failed step created is dropped; what existed before is not copied
        state = self.state
        fresh = [p for p in params if not state.get(p)]
        try:
            self.last_total_norm = self.clipper(grads, params)
            if getattr(self.clipper, "last_step_skipped", False):
                return loss
            self.optimizer.step()
        except BaseException:
            if restore:
                _restore.put_grads(params, list(saved_grads))
                self._clipper_restore(saved_clipper)
                self.last_total_norm = saved_norm
            for p in fresh:
                state.pop(p, None)
            raise
        return loss

    def _traced_step(self, closure: Callable[[], Any] | None) -> Any:
        """``step()`` while Dynamo traces it: the clipper runs inside the
        ``fastclip::clipper_call_`` operator, the wrapped optimizer's step is
        traced as torch traces it.  No snapshot and no ``try``: a failed
        compiled step is not undone (the class docstring's **Compiled steps**
        says what it leaves, ``test_clipped_optimizer_compile.py`` checks it).

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
        if self._inner() is None:  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's ``state_dict()`` plus ``"fastclip_clipper"``:
        ``clipper.state_dict()`` (when the clipper has one)."""
        sd: dict[str, Any] = dict(self.optimizer.state_dict())
        if hasattr(self.clipper, "state_dict"):
            sd[_layout.CLIPPER_KEY] = self.clipper.state_dict()
        return sd

    @public_method("load_state_dict")
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load :meth:`state_dict`'s output (or the earlier ``{"optimizer",
        "clipper"}`` layout): the clipper's part is checked first, on a copy
        of the clipper, then the optimizer is loaded, then the clipper; a
        refused load changes nothing."""
        inner_sd, clipper_sd, has_clipper = _layout.split(state_dict)
        loads = _layout.check_clipper_part(self.clipper, state_dict, has_clipper)
        clipper: Any = self.clipper
        if loads:
            copy.deepcopy(clipper).load_state_dict(clipper_sd)  # refuses before any write
        saved = self._clipper_snapshot()
        self.optimizer.load_state_dict(inner_sd)
        if loads:
            try:
                clipper.load_state_dict(clipper_sd)
            except BaseException:  # only a clipper whose copy loads but itself does not
                self._clipper_restore(saved)
                raise

    def __repr__(self) -> str:
        return f"ClippedOptimizer({self.optimizer!r}, clipper={self.clipper!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for stale in ("param_groups", "state", "defaults"):  # pickles of the earlier class
            state.pop(stale, None)
        self.__dict__.update(state)
        self._handle = _ops.register(self)  # a copy or an unpickled optimizer: its own


ClippedOptimizer.__module__ = "fastclip.torch"  # the public path: reprs, docs and pickles name it
