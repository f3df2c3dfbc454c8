"""Worker side of test_backward_norm_distributed.py (spawned gloo ranks).

Each rank trains the same small model for a few steps under DDP (each rank its
own slice of the batch) or FSDP2 (``fully_shard``), with
``fastclip.torch.FusedAdamW(norm_in_backward=True)`` or ``BackwardNorm.clip_``,
every parameter hooked, and pickles the losses, norms and final weights.
"""

from __future__ import annotations

from typing import Any

import _dist_workers as W
import numpy as np

STEPS = 3
MAX_NORM = 0.05  # below the gradients' norm: every step clips
BATCH = 8


def model(seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batches() -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 5, generator=g) for _ in range(STEPS)]


def _hook_all() -> None:
    import fastclip._config as cfg

    cfg.BACKWARD_HOOK_MIN_NUMEL = 0  # the hooks, not the packed pass, under test


def _ddp(
    world: int, rank: int, form: str, comm_hook: bool = False, bucket_view: bool = False
) -> dict[str, Any]:
    import torch

    import fastclip.torch as fct

    _hook_all()
    net = model()
    ddp = torch.nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=bucket_view)
    per = BATCH // world
    if form == "fused":
        opt: Any = fct.FusedAdamW(
            net.parameters(), lr=1e-2, max_norm=MAX_NORM, norm_in_backward=True
        )
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        bn = fct.BackwardNorm(net)
    if comm_hook:  # the norms from DDP's all-reduced buckets
        (opt.backward_norm if form == "fused" else bn).register_ddp(ddp)
    norms, remeasured = [], []
    for x in batches():
        loss = ddp(x[rank * per : (rank + 1) * per]).pow(2).mean()
        loss.backward()
        if form == "fused":
            opt.step()
            norms.append(float(opt.last_total_norm))
            remeasured.append(opt.backward_norm.last_remeasured)
        else:
            norms.append(float(bn.clip_(MAX_NORM)))
            remeasured.append(bn.last_remeasured)
            opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "norms": norms,
        "remeasured": remeasured,
        "weights": [p.detach().double().numpy() for p in net.parameters()],
    }


def _fsdp(world: int, rank: int) -> dict[str, Any]:
    import torch

    import fastclip.torch as fct

    _hook_all()
    net = W.fully_sharded(model(), world)
    bn = fct.BackwardNorm(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    norms, torch_norms = [], []
    for x in batches():
        net(x).pow(2).mean().backward()
        # torch's own DTensor-aware norm of the same gradients, before the clip
        torch_norms.append(
            float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]).full_tensor())
        )
        norms.append(float(bn.clip_(MAX_NORM)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "norms": norms,
        "torch_norms": torch_norms,
        "remeasured": bn.last_remeasured,
        "weights": [np.asarray(p.detach().full_tensor().double()) for p in net.parameters()],
    }


def _scenarios(rec: Any, world: int, rank: int) -> None:
    rec.run("ddp-fused", _ddp, world, rank, "fused")
    rec.run("ddp-standalone", _ddp, world, rank, "standalone")
    rec.run("ddp-comm-fused", _ddp, world, rank, "fused", True)
    rec.run("ddp-comm-standalone", _ddp, world, rank, "standalone", True)
    rec.run("ddp-comm-view-fused", _ddp, world, rank, "fused", True, True)
    rec.run("fsdp", _fsdp, world, rank)


def run_suite(rank: int, world: int, port: int, outdir: str) -> None:
    """Entry point of every spawned rank of test_backward_norm_distributed.py."""
    W._run(rank, world, port, outdir, _scenarios)
