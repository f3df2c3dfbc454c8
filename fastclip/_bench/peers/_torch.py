"""torch itself: ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` /
``get_total_norm`` with ``foreach=True`` (``torch-foreach``) or ``foreach=False``
(``torch-loop``), vectorised ops for per-row, on CPU or CUDA; the Opacus formula
written with torch ops for ``per-sample``; ``clip_grad_norm_`` +
``torch.optim.AdamW`` (foreach, loop or ``fused=True``) for ``adamw``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..data import ADAMW, CaseData, Unsupported
from ._common import Op, params_and_moments


def _torch_adamw(d: CaseData, foreach: bool, fused: bool, device: str) -> Op:
    """``clip_grad_norm_`` + ``torch.optim.AdamW`` (foreach, loop or fused)."""
    import torch

    params = d.param_copies("torch", device)
    if fused:
        opt = torch.optim.AdamW(params, **ADAMW, fused=True)
    else:
        opt = torch.optim.AdamW(params, **ADAMW, foreach=foreach)
    c = d.max_norm

    def op() -> list[Any]:
        torch.nn.utils.clip_grad_norm_(params, c, foreach=foreach)
        opt.step()
        return params_and_moments(params, opt)

    if fused:  # the CPU fused kernels need a recent torch and CPU support
        try:
            probe = torch.nn.Parameter(torch.zeros(4, device=device))
            probe.grad = torch.zeros(4, device=device)
            torch.optim.AdamW([probe], fused=True).step()
        except (RuntimeError, ValueError) as exc:
            raise Unsupported(f"torch AdamW(fused=True) is not available here: {exc}") from exc
    return op


def _torch_ops(d: CaseData, inplace: bool, foreach: bool, device: str, fused: bool = False) -> Op:
    import torch

    if d.case.kind == "adamw":
        return _torch_adamw(d, foreach, fused, device)
    if fused:
        raise Unsupported("fused=True is a torch.optim option: the adamw workload only")
    if d.case.kind == "persample":
        if not foreach:
            raise Unsupported("the Opacus formula has one torch form (torch-foreach)")
        return _opacus_formula(d.torch_tensors(device), d.max_norm)
    utils = torch.nn.utils
    params = d.torch_params(device)
    grads = [p.grad for p in params]
    kind = d.case.kind
    if kind == "clip":
        c = d.max_norm
        if inplace:
            return lambda: (utils.clip_grad_norm_(params, c, foreach=foreach), grads)[1]

        def clip() -> list[Any]:
            total = utils.get_total_norm(grads, foreach=foreach)
            coef = torch.clamp(c / (total + 1e-6), max=1.0)
            if foreach:
                return list(torch._foreach_mul(grads, coef))
            return [g * coef for g in grads]

        return clip
    if kind == "rows":
        if not foreach:
            raise Unsupported("per-row clipping has one torch form: vectorised (torch-foreach)")
        c = d.max_norm
        x = grads[0]

        def rows() -> list[Any]:
            f = (c / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-6)).clamp_(max=1.0)
            if inplace:
                x.mul_(f)
                return grads
            return [x * f]

        return rows
    if kind == "value":
        v = d.clip_value
        if inplace:
            return lambda: (utils.clip_grad_value_(params, v, foreach=foreach), grads)[1]
        if foreach:
            return lambda: list(torch._foreach_clamp_max(torch._foreach_clamp_min(grads, -v), v))
        return lambda: [torch.clamp(g, -v, v) for g in grads]
    return lambda: utils.get_total_norm(grads, foreach=foreach)


def _opacus_formula(grads: list[Any], max_norm: float) -> Op:
    """Opacus' flat clipping written with torch ops (``DPOptimizer.clip_and_accumulate``)."""
    import torch

    def op() -> list[Any]:
        per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grads]
        norms = torch.stack(per_param, dim=1).norm(2, dim=1)
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        return [torch.einsum("i,i...", factor, g) for g in grads]

    return op


def torch_backend(
    foreach: bool, device: str, fused: bool = False
) -> Callable[[CaseData, bool], Op]:
    return lambda d, inplace: _torch_ops(d, inplace, foreach, device, fused)
