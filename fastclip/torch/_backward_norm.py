"""``BackwardNorm``: the global gradient norm taken while backward produces the gradients.

Global-norm clipping needs the norm of every gradient before the step can
start: one more read of every gradient after ``backward()``.  Here a
parameter's ``register_post_accumulate_grad_hook`` takes its gradient's norm
the moment autograd has accumulated it, and the step only combines the stored
per-tensor norms (by default CUDA parameters are hooked; CPU gradients are
measured in one packed pass when the norm is asked for: the class's Notes say
why).

Each stored norm remembers the gradient it measured (a weak reference) and
that tensor's autograd version counter.  At the step, a gradient that is no
longer the one measured, or that was written in place since (``zero_grad``,
``GradScaler.unscale_``, a clip, DDP's all-reduce), is measured again then:
the result is always the norm of the gradients as they are, never a stale one
(:attr:`BackwardNorm.last_remeasured` says how many were re-measured).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from fastclip import _config
from fastclip._errors import public_method
from fastclip._validate import check_max_norm, check_ord

from ._clip_grad import _clip_grads_with_norm, _nonfinite_error, _norm_type
from ._ddp_hook import ddp_allreduce_then_measure
from ._grad_measures import (
    _combine,
    _finite,
    _local,
    _Measure,
    _mesh_group,
    _Named,
    _norm_of,
    _result,
    _unscaled,
)

__all__ = ["BackwardNorm"]


class BackwardNorm:
    r"""The global gradient norm, taken while ``backward()`` produces the gradients.

    Registers a ``register_post_accumulate_grad_hook`` on the parameters
    that require grad (by default the CUDA ones, see ``min_hook_numel``); each
    hook takes its gradient's norm with fastclip's kernels as soon as autograd
    has accumulated it.  After ``backward()``, :meth:`total_norm` and
    :meth:`clip_` replace ``get_total_norm`` and ``clip_grad_norm_``, combining
    the hooks' norms with one packed pass over the gradients that have none.

    Parameters
    ----------
    parameters : iterable of torch.Tensor or torch.nn.Module
        The parameters (a Module: its ``parameters()``, and errors name them).
    norm_type : float, default 2
        Any ``p > 0`` or ``inf`` (``norm_type`` <= 0 is not a norm: ValueError).
    min_hook_numel : int, optional
        Parameters with fewer elements get no hook: their gradients are
        measured together, in one packed launch, when the norm is asked for
        (0: hook every parameter).  Default: no hook on CPU parameters
        (``fastclip._config.BACKWARD_HOOK_MIN_NUMEL``), a hook on every CUDA
        parameter (``BACKWARD_HOOK_MIN_NUMEL_CUDA``); see Notes.
    grad_scaler : torch.amp.GradScaler, optional
        The scaler of a mixed-precision loop: after ``scaler.unscale_(opt)``
        (which rewrites the gradients without moving autograd's version
        counters) the gradients are measured again.  Without it, call
        :meth:`invalidate` after ``unscale_``.

    Attributes
    ----------
    last_remeasured : int
        How many hooked gradients the last :meth:`total_norm` measured itself
        because their hook value was stale (the gradient was replaced or
        written in place after the hook ran) or missing (the small gradients
        without a hook are not counted: they are always measured then).

    Notes
    -----
    * Where the norm is taken: on CUDA parameters, by the hooks (fastclip's
      kernels enqueued on torch's current stream right behind the kernel that
      wrote the gradient, while the host runs ahead); on CPU parameters, by
      default in one packed pass when the norm is asked for, because on the
      CPU no hook pays: a hook's Python runs between autograd's kernels with
      cold caches (~150 us for a 256-value gradient, 20 us outside backward)
      and large gradients are no longer in cache when it runs (hooks on GPT-2
      small's tensors added about twice the time of the packed pass to
      backward).  ``min_hook_numel=0`` hooks them anyway.
    * The norm is always that of the gradients as they are when
      :meth:`total_norm` runs: a gradient written after its hook (by
      ``zero_grad(set_to_none=False)``, ``torch.amp.GradScaler.unscale_``,
      a clip, DDP's all-reduce, any in-place op) is detected by its autograd
      version counter and measured again then.  Writes that bypass the
      version counter (through ``.data``, a NumPy view of the tensor, or
      ``GradScaler.unscale_``, see below) are not seen: call
      :meth:`invalidate` after them.
    * Gradient accumulation: every ``backward()`` re-measures the
      accumulated gradient, so the norm is that of the sum, not a sum of
      micro-batch norms.  Put all but the last micro-batch's backward inside
      :meth:`accumulating` to skip those measurements.
    * ``torch.amp.GradScaler``: ``unscale_`` rewrites every gradient without
      moving their version counters, so pass ``grad_scaler=`` (or call
      :meth:`invalidate`): they are then measured again (the cost of a plain
      norm pass).  ``FusedAdamW`` / ``FusedSGD(norm_in_backward=True)`` need
      neither: ``scaler.step(opt)`` hands them the scale and they divide the
      stored norm by it.
    * DDP: call :meth:`register_ddp` with the DDP module: its comm hook
      averages each bucket as DDP's default hook does and measures the
      all-reduced gradients there, bucket by bucket, while backward goes on.
      Without it, the hooks see each rank's local gradient and DDP then writes
      the all-reduced one, so every gradient is measured again at the step
      (the result is still the all-reduced gradients' norm).
    * DTensor gradients (FSDP2, tensor parallel): the hooks measure the local
      shards; :meth:`total_norm` reduces them over the mesh's group with
      :func:`fastclip.distributed.global_norm` (one collective), counting
      ``Replicate`` shards once.  Call it on every rank.
    * CUDA gradients: the hooks launch fastclip's CUDA kernels on torch's
      current stream and keep the norms on the device (no host sync).
    * The hooks run eagerly (also when the forward is compiled with
      ``torch.compile``); remove them with :meth:`remove` or by using the
      object as a context manager.

    Examples
    --------
    >>> import torch
    >>> from fastclip.torch import BackwardNorm
    >>> model = torch.nn.Linear(3, 1)
    >>> with BackwardNorm(model) as bn:
    ...     model(torch.ones(2, 3)).sum().backward()
    ...     total = bn.clip_(max_norm=1.0)
    >>> bool(abs(total - 4.0) < 1e-6)  # the gradient [2, 2, 2] and the bias' 2
    True
    """

    @public_method("__init__", tracing=torch.compiler.is_compiling)
    def __init__(
        self,
        parameters: Iterable[torch.Tensor] | torch.nn.Module,
        norm_type: float = 2.0,
        *,
        grad_scaler: Any = None,
        min_hook_numel: int | None = None,
    ) -> None:
        norm_type = _norm_type(norm_type)
        if math.isnan(norm_type):
            check_ord(norm_type, "norm_type")  # its message
        if not norm_type > 0:
            raise ValueError(
                f"norm_type must be a norm (norm_type > 0 or inf), got {norm_type}; "
                "use fastclip.torch.get_total_norm for norm_type <= 0"
            )
        self.ord_code, self.p = check_ord(norm_type)
        self.norm_type = norm_type
        self.last_remeasured = 0
        self._names: list[str] | None = None
        self._params: list[torch.Tensor] = []
        self._measures: list[_Measure | None] = []
        self._handles: list[Any] = []
        self._active = True
        self._scaler = grad_scaler
        self._hooked: list[bool] = []
        self._hook_handles: dict[int, Any] = {}
        self._removed = False
        self._pending: dict[int, Any] = {}  # DDP comm hook: measured, not yet committed
        self._queued = False
        self._ddp_index: dict[int, int] = {}
        self._ddp_group: Any = None
        self.min_hook_numel = None if min_hook_numel is None else int(min_hook_numel)
        if isinstance(parameters, torch.nn.Module):
            named = list(parameters.named_parameters())
            self._names = []
            self.add([p for _, p in named], [n for n, _ in named])
        else:
            self.add(parameters)

    @public_method("add", tracing=torch.compiler.is_compiling)
    def add(self, parameters: Iterable[torch.Tensor], names: list[str] | None = None) -> None:
        """Also measure ``parameters`` (those that require grad; each one once)."""
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"parameters[{i}] must be a torch tensor (BackwardNorm takes torch tensors: "
                    "it hooks parameters), "
                    f"got {type(p).__module__}.{type(p).__qualname__}; for NumPy (or any Array "
                    "API) gradients use the array API: fastclip.global_norm(grads)"
                )
        known = {id(p) for p in self._params}
        for k, p in enumerate(params):
            if not p.requires_grad or id(p) in known:
                continue
            known.add(id(p))
            index = len(self._params)
            self._params.append(p)
            self._measures.append(None)
            if self._names is not None:
                self._names.append(names[k] if names is not None else str(index))
            hooked = _local(p)[0].numel() >= self._threshold(p)
            self._hooked.append(hooked)
            if hooked:
                handle = p.register_post_accumulate_grad_hook(self._hook(index))
                self._handles.append(handle)
                self._hook_handles[index] = handle

    def _threshold(self, p: torch.Tensor) -> int:
        if self.min_hook_numel is not None:
            return self.min_hook_numel
        if p.device.type == "cpu":
            return _config.BACKWARD_HOOK_MIN_NUMEL
        return _config.BACKWARD_HOOK_MIN_NUMEL_CUDA

    def _hook(self, index: int) -> Any:
        def hook(param: torch.Tensor) -> None:
            if not self._active:
                return
            grad = param.grad
            if grad is None or grad.is_sparse:
                self._measures[index] = None  # measured (or refused) at the step
                return
            self._measures[index] = self._measure(grad)

        return hook

    def _measure(self, grad: torch.Tensor) -> _Measure:
        with torch.no_grad():
            local, counts = _local(grad)
            value = (
                _norm_of([local], self.ord_code, self.p, self.norm_type) if local.numel() else 0.0
            )
        return _Measure(grad, local._version, value, counts)

    # -- results ---------------------------------------------------------------

    def _collect(self) -> tuple[list[torch.Tensor], list[Any], list[torch.Tensor]]:
        """The gradients that are not None, the hooks' norms still valid (0.0 for
        shards another rank counts), and the tensors to measure now (small
        gradients, which have no hook, and stale ones)."""
        grads: list[torch.Tensor] = []
        values: list[Any] = []
        now: list[torch.Tensor] = []
        remeasured = 0
        if self._scaler is not None and _unscaled(self._scaler):
            self.invalidate()  # GradScaler.unscale_ wrote behind the version counters
        for k, p in enumerate(self._params):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("BackwardNorm does not support sparse gradients")
            grads.append(g)
            local, counts = _local(g)
            m = self._measures[k]
            if m is not None and m.ref() is g and local._version == m.version:
                values.append(m.value if m.counts else 0.0)
                continue
            if self._hooked[k]:
                remeasured += 1
            if counts and local.numel():
                now.append(local)
        self.last_remeasured = remeasured
        return grads, values, now

    def _total(self, error_if_nonfinite: bool) -> tuple[list[torch.Tensor], Any, bool]:
        """(gradients, total norm as a float or float64 device tensor, any DTensor)."""
        grads, values, now = self._collect()
        if not grads:
            return grads, None, False
        locals_ = [_local(g)[0] for g in grads]
        device = locals_[0].device
        if now:  # one packed launch for all of them: their norm is one more entry
            with torch.no_grad():
                values.append(_norm_of(now, self.ord_code, self.p, self.norm_type))
        total = _combine(values or [0.0], self.ord_code, self.p, device)
        sharded = any(a is not g for a, g in zip(locals_, grads))
        if sharded:
            from fastclip import distributed

            row = torch.as_tensor(total, dtype=torch.float64).reshape(1).to(device)
            total = distributed.global_norm([row], self.norm_type, group=_mesh_group(grads))
            total = total.to(torch.float64).reshape(())
        if error_if_nonfinite and not _finite(total):
            names = None if self._names is None else self._grad_names()
            raise _nonfinite_error(self.norm_type, _Named(locals_, names))  # finds which
        return grads, total, sharded

    def _grad_names(self) -> list[str]:
        assert self._names is not None
        return [n for n, p in zip(self._names, self._params) if p.grad is not None]

    @public_method("total_norm", tracing=torch.compiler.is_compiling)
    def total_norm(self, error_if_nonfinite: bool = False) -> torch.Tensor:
        """The norm of all gradients as one vector, as ``get_total_norm`` returns it.

        A 0-d tensor in torch's dtype (the promoted dtype of the gradients, on
        their device); ``tensor(0.)`` when no parameter has a gradient.  With
        ``error_if_nonfinite``, a NaN/inf norm raises
        :class:`fastclip.NonFiniteNormError` (``.indices`` among the gradients
        that are not None, ``.names`` for a Module).
        """
        grads, total, _ = self._total(error_if_nonfinite)
        if not grads:
            return torch.tensor(0.0)
        return _result(grads, total)

    def total_norm64(self) -> Any:
        """The total norm in float64: a Python float for CPU gradients, a 0-d device
        tensor for CUDA ones (no host sync); None when no parameter has a gradient.
        What the fused optimizers clip with."""
        return self._total(False)[1]

    @public_method("clip_", tracing=torch.compiler.is_compiling)
    def clip_(
        self, max_norm: float, error_if_nonfinite: bool = False, foreach: bool | None = None
    ) -> torch.Tensor:
        """``clip_grad_norm_`` with the norm taken during backward.

        Scales every gradient by ``min(1, max_norm / (total_norm + 1e-6))`` in
        place and returns the total norm before clipping (see
        :meth:`total_norm`).  ``foreach`` is accepted and ignored.
        """
        max_norm = check_max_norm(max_norm)
        grads, total, sharded = self._total(error_if_nonfinite)
        if not grads:
            return torch.tensor(0.0)
        result = _result(grads, total)
        locals_ = [_local(g)[0] for g in grads] if sharded else grads
        if type(total) is float and max_norm / (total + 1e-6) >= 1.0:
            return result  # the coefficient is 1: nothing to scale (torch multiplies by 1)
        _clip_grads_with_norm(locals_, max_norm, torch.as_tensor(total, dtype=torch.float64))
        return result

    def invalidate(self) -> None:
        """Forget the stored norms: the next call measures every gradient.

        Call it after writing gradients in a way autograd's version counter
        does not record (``.data``, a NumPy view, ``GradScaler.unscale_``
        when the scaler was not given as ``grad_scaler``)."""
        self._measures = [None] * len(self._params)

    # -- DDP -----------------------------------------------------------------

    @public_method("register_ddp", tracing=torch.compiler.is_compiling)
    def register_ddp(self, ddp_model: Any, process_group: Any = None) -> None:
        """Take the norms from DDP's all-reduced buckets (a DDP communication hook).

        Registers a comm hook on ``ddp_model`` (a
        ``torch.nn.parallel.DistributedDataParallel``) that averages each bucket
        as DDP's default hook does (divide by the group size, then
        ``all_reduce``) and then measures the bucket's gradients, all-reduced,
        in one launch.  The post-accumulate hooks of the parameters DDP reduces
        are removed (they would see each rank's local gradient).  Replaces any
        comm hook the model had; call it before the first backward.
        """
        import torch.distributed as dist

        group = process_group if process_group is not None else dist.group.WORLD
        index = {id(p): k for k, p in enumerate(self._params)}
        reduced = {index[id(p)] for p in ddp_model.parameters() if id(p) in index}
        for k in reduced:
            if k in self._hook_handles:
                self._hook_handles.pop(k).remove()
            self._hooked[k] = True  # measured by the comm hook: stale ones are counted
        self._ddp_index = index
        self._ddp_group = group
        ddp_model.register_comm_hook(self, ddp_allreduce_then_measure)

    def _after_ddp(self) -> None:
        """Queued by the first bucket's comm hook, which runs before DDP queues its
        own final callback (the one that waits for the buckets and writes
        ``.grad``): queue the commit once more, behind DDP's."""
        torch.autograd.Variable._execution_engine.queue_callback(self._commit_pending)

    def _commit_pending(self) -> None:
        """Autograd's final callback, after DDP wrote the reduced gradients into
        ``.grad``: the bucket measures become the parameters' measures."""
        pending, self._pending = self._pending, {}
        self._queued = False
        for k, value in pending.items():
            g = self._params[k].grad
            if g is not None:
                self._measures[k] = _Measure(g, g._version, value, True)

    # -- lifetime --------------------------------------------------------------

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Skip the hooks' measurements inside (the micro-batches before the last).

        Like DDP's ``no_sync``: the gradients still accumulate; the last
        ``backward()``, outside, measures the accumulated gradients.
        Forgetting it costs one measurement per micro-batch, never a wrong norm.
        """
        previous, self._active = self._active, False
        try:
            yield
        finally:
            self._active = previous

    def remove(self) -> None:
        """Remove every hook (idempotent); the object then measures at each call."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hook_handles.clear()
        self._hooked = [False] * len(self._params)
        self._removed = True
        self.invalidate()

    def __enter__(self) -> BackwardNorm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"BackwardNorm({len(self._params)} parameters, norm_type={self.norm_type}, "
            f"hooks={'removed' if self._removed else len(self._handles)})"
        )


BackwardNorm.__module__ = "fastclip.torch"
