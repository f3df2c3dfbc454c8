"""Opacus itself (``opacus``): ``DPOptimizer.clip_and_accumulate`` (no noise) on
``p.grad_sample``, the per-sample workload only."""

from __future__ import annotations

from typing import Any

from ..data import CaseData, Unsupported
from ._common import Op


def make_opacus(d: CaseData, inplace: bool) -> Op:
    """Opacus itself: ``DPOptimizer.clip_and_accumulate`` (no noise) on ``p.grad_sample``."""
    if d.case.kind != "persample":
        raise Unsupported("Opacus clips per-sample gradients: the per-sample workload only")
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from opacus.optimizers import DPOptimizer

    grads = d.torch_tensors("cpu")
    params: list[Any] = []  # Opacus adds grad_sample / summed_grad attributes
    for g in grads:
        p: Any = torch.nn.Parameter(torch.zeros(g.shape[1:], dtype=g.dtype))
        p.grad_sample = g
        params.append(p)
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=d.max_norm,
        expected_batch_size=grads[0].shape[0],
    )

    def op() -> list[Any]:
        for p in params:  # what zero_grad + a new backward would give: fresh per-sample grads
            p.summed_grad = None  # clip_and_accumulate adds to it
            if hasattr(p.grad_sample, "_processed"):
                del p.grad_sample._processed  # Opacus' "used in a step" mark
        opt.clip_and_accumulate()
        return [p.summed_grad for p in params]

    return op
