"""What SPAMAdamW and StableSPAMAdamW share: the gradient checks made before any
state changes, the non-finite policies, the optimizer-wide counters in the state
dict."""

from __future__ import annotations

import math
from typing import Any

import torch

from fastclip._errors import NonFiniteNormError
from fastclip._validate import NONFINITE_POLICIES

from ._spam_fused import choose_route

__all__ = ["CPU_CHUNK_ELEMENTS", "SpamBase", "check_beta", "check_int", "check_real", "chunks"]


def check_real(
    what: str,
    name: str,
    value: Any,
    *,
    ge: float | None = 0.0,
    gt: float | None = None,
    finite: bool = True,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}: {name} must be a real number, got {value!r}")
    v = float(value)
    bad = math.isnan(v) or (finite and math.isinf(v))
    bad = bad or (ge is not None and not v >= ge) or (gt is not None and not v > gt)
    if bad:
        bound = f" >= {ge:g}" if ge is not None else (f" > {gt:g}" if gt is not None else "")
        raise ValueError(f"{what}: {name} must be a finite number{bound}, got {value!r}")
    return v


def check_int(what: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what}: {name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{what}: {name} must be an int >= 0, got {value!r}")
    return int(value)


def check_beta(what: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{what}: betas must be a pair of floats, got {betas!r}")
    b1, b2 = (check_real(what, f"betas[{i}]", b) for i, b in enumerate(betas))
    if not (b1 < 1 and b2 < 1):
        raise ValueError(f"{what}: betas must be in [0, 1), got {betas!r}")
    return b1, b2


#: On the CPU, the multi-tensor ops run over chunks of at most this many elements (a
#: tensor larger than it is a chunk of its own).  torch's CPU ``_foreach`` ops are
#: loops of single-tensor ops, so one op over the whole list streams every tensor
#: from memory before the next op starts; chunk by chunk, a tensor's ~15 passes
#: find it in cache.  Measured on GPT-2-small shapes (2 blocks, 16.5M float32, a
#: shared 2-core EPYC): the whole-list SPAM step took 1.5-2.8x the time of a
#: per-parameter loop; see benchmarks/bench_adaptive_methods.py.
CPU_CHUNK_ELEMENTS = 1 << 18


def chunks(ps: list[torch.Tensor]) -> list[slice]:
    """Index ranges of ``ps`` to step together: all of them on a device, cache-sized
    runs on the CPU (``CPU_CHUNK_ELEMENTS``)."""
    if not ps or ps[0].device.type != "cpu":
        return [slice(0, len(ps))]
    out, start, size = [], 0, 0
    for i, p in enumerate(ps):
        n = p.numel()
        if i > start and size + n > CPU_CHUNK_ELEMENTS:
            out.append(slice(start, i))
            start, size = i, 0
        size += n
    out.append(slice(start, len(ps)))
    return out


class SpamBase(torch.optim.Optimizer):
    """Checks, policies and the state dict's optimizer-wide counters."""

    _WHAT = "fastclip.torch.SpamBase"
    #: optimizer-wide counters saved under the state dict's ``"counters"`` key
    _COUNTERS: tuple[str, ...] = ()
    #: whether a fused CUDA kernel exists (else CUDA tensors take the foreach route)
    _CUDA = False
    #: whether the fused step applies the non-finite policy itself
    _POLICY_IN_STEP = False
    nonfinite: str
    last_step_skipped: bool
    #: the route the last step took: "cpu", "cuda" (fused kernels) or "foreach"
    last_step_route: str | None = None
    fused: bool | None = None

    def _set_policy(self, nonfinite: Any) -> None:
        if not isinstance(nonfinite, str) or nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"{self._WHAT}: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}"
            )
        self.nonfinite = nonfinite
        self.last_step_skipped = False

    def _start(self, closure: Any) -> tuple[Any, Any, str]:
        """The closure's loss, the work of this step (``_collect``), or None when
        the non-finite policy skips it, and the route of the step
        (``choose_route``: ``"cpu"``, ``"cuda"`` or ``"foreach"``).

        A fused route with ``_POLICY_IN_STEP`` applies the non-finite policy
        itself, from a pass it makes anyway (Stable-SPAM's max |g|).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect()
        route = choose_route(f"{self._WHAT}.step", work, getattr(self, "fused", None), self._CUDA)
        self.last_step_route = route
        if route != "foreach" and self._POLICY_IN_STEP:
            self.last_step_skipped = False
            return loss, work, route
        return loss, (None if self._skip(work) else work), route

    def _collect(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        """(group, params, grads) of parameters with a gradient, every gradient
        checked before anything is written."""
        out = []
        for group in self.param_groups:
            ps, gs = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError(f"{self._WHAT}.step: sparse gradients are not supported")
                if g.is_complex() or not g.is_floating_point():
                    raise TypeError(
                        f"{self._WHAT}.step: real floating gradients only, got {g.dtype}"
                    )
                if g.shape != p.shape:
                    raise ValueError(
                        f"{self._WHAT}.step: a gradient of shape {tuple(g.shape)} for a "
                        f"parameter of shape {tuple(p.shape)}"
                    )
                ps.append(p)
                gs.append(g)
            out.append((group, ps, gs))
        return out

    def _skip(self, work: list[Any]) -> bool:
        """Apply the non-finite policy before any state changes: True = skip this step.

        "propagate" (the reference optimizers' behaviour) reads nothing; the
        others read one flag from the device (one synchronisation per step).
        """
        self.last_step_skipped = False
        if self.nonfinite == "propagate":
            return False
        grads = [g for _, _, gs in work for g in gs]
        if not grads:
            return False
        maxima = torch._foreach_norm(grads, math.inf)
        finite = bool(
            torch.stack([m.to(maxima[0].device, torch.float32) for m in maxima]).isfinite().all()
        )
        if finite:
            return False
        self._refuse()
        return True

    def _refuse(self) -> None:
        """A gradient is not finite: raise ("error") or mark the step skipped ("skip")."""
        if self.nonfinite == "error":
            raise NonFiniteNormError(
                f"{self._WHAT}.step: a gradient is not finite; no parameter or optimizer "
                "state was changed"
            )
        self.last_step_skipped = True

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict, plus the optimizer-wide step counters
        under ``"counters"``."""
        sd = super().state_dict()
        sd["counters"] = {k: getattr(self, k) for k in self._COUNTERS}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output (the counters checked first: a refused
        dict leaves the optimizer as it was)."""
        sd = dict(state_dict)
        counters = sd.pop("counters", None)
        if not isinstance(counters, dict) or set(counters) != set(self._COUNTERS):
            raise ValueError(
                f"{self._WHAT}.load_state_dict: needs 'counters' with keys "
                f"{list(self._COUNTERS)}, got {counters!r}"
            )
        values = {k: check_int(f"{self._WHAT}.load_state_dict", k, v) for k, v in counters.items()}
        super().load_state_dict(sd)
        for k, v in values.items():
            setattr(self, k, v)
