"""Adaptive clippers and fused optimizers across spawned ranks (test_distributed_layouts.py).

Each rank runs the same clipper on its shards of the same gradients for
``STEPS`` steps (norms rising and falling, two spikes) through
``fastclip.distributed.clip_with_``, and the fused optimizers with DTensor
parameters; the parent checks that every rank ends with the same state and
that it equals a single process fed the full gradients.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from _dist_workers import _np, _Recorder
from _layout_workers import Ctx, _dtensors, _pp_local, full

STEPS = 20
#: (dp, tp) DTensors whose units (axis 0, AGC's "torch" layout) are whole on each rank.
ADAPT = {
    "q": ((6, 4), ("S0", "R")),
    "mlp": ((5, 4), ("R", "S0")),
    "ln": ((4,), ("R", "R")),
    "o": ((4, 6), ("S0", "S0")),
}


def scale_at(t: int) -> float:
    """The gradients' scale at step t: a slow drift, spikes at steps 7 and 13."""
    return float(np.exp(0.3 * np.sin(t))) * (40.0 if t in (7, 13) else 1.0)


def clippers() -> dict[str, Any]:
    from fastclip.adaptive import AGC, AutoClip, GlobalNormClipper, ZClip

    return {
        "global": GlobalNormClipper(5.0),
        "autoclip": AutoClip(25),
        "zclip": ZClip(warmup_steps=5),
        "agc": AGC(0.05),
    }


def grad_name(name: str) -> str:
    return "g." + name


def _clipper_run(ctx: Ctx, kind: str) -> dict[str, Any]:
    import fastclip.distributed as fcd

    clipper = clippers()[kind]
    spec = {grad_name(n): v for n, v in ADAPT.items()}
    params = _dtensors(ADAPT, ctx.dense) if kind == "agc" else None
    norms = []
    grads: list[Any] = []
    for t in range(STEPS):
        grads = _dtensors(spec, ctx.dense, scale=scale_at(t))
        norms.append(float(fcd.clip_with_(clipper, grads, params)))
    return {
        "state": clipper.state_dict(),
        "norms": norms,
        "grads": [_np(g.full_tensor()) for g in grads],
    }


def _pp_autoclip(ctx: Ctx) -> dict[str, Any]:
    """AutoClip over pipeline stages: plain tensors, a layout and a tie (a Plan)."""
    import fastclip.distributed as fcd
    from fastclip.adaptive import AutoClip

    clipper = AutoClip(50)
    for t in range(STEPS):
        arrays, layouts, tied = _pp_local(ctx, dtensor=False)
        for a in arrays:
            a.mul_(scale_at(t))
        fcd.clip_with_(clipper, arrays, plan=fcd.Plan(layout=layouts, tied=tied))
    return {"state": clipper.state_dict()}


def fused(kind: str, params: list[Any], plan: Any = None) -> Any:
    from fastclip.torch import FusedAdamW, FusedSGD

    if kind == "adamw":
        return FusedAdamW(params, lr=1e-2, max_norm=2.0, norm_plan=plan)
    return FusedSGD(params, lr=1e-2, momentum=0.9, max_norm=2.0, norm_plan=plan)


def _fused_run(ctx: Ctx, kind: str) -> dict[str, Any]:
    import torch

    params = [torch.nn.Parameter(d) for d in _dtensors(ADAPT, ctx.dense)]
    opt = fused(kind, params)
    spec = {grad_name(n): v for n, v in ADAPT.items()}
    norms = []
    for t in range(STEPS):
        for p, g in zip(params, _dtensors(spec, ctx.dense, scale=scale_at(t))):
            p.grad = g
        opt.step()
        norms.append(float(opt.last_total_norm))
    state = [
        {k: _np(v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in s.items()}
        for s in (opt.state[p] for p in params)
    ]
    return {"norms": norms, "params": [_np(p.full_tensor()) for p in params], "state": state}


def _fused_pipeline(ctx: Ctx) -> dict[str, Any]:
    """FusedAdamW over pipeline stages: plain tensors, a Plan keyed by parameters."""
    import torch

    import fastclip.distributed as fcd

    arrays, layouts, tied = _pp_local(ctx, dtensor=False)
    params = [torch.nn.Parameter(torch.zeros_like(a)) for a in arrays]
    ties = [(params[k], g) for k, a in enumerate(arrays) for t, g in tied if t is a]
    plan = fcd.Plan(layout=dict(zip(params, layouts)), tied=ties)
    opt = fused("adamw", params, plan)
    norms = []
    for t in range(STEPS):
        for p, a in zip(params, arrays):
            p.grad = a * scale_at(t)
        opt.step()
        norms.append(float(opt.last_total_norm))
    return {"norms": norms}


def _refusals(ctx: Ctx) -> dict[str, Any]:
    """Rank 1's bad input refuses a clipper step and an optimizer step on every rank."""
    import time

    import torch

    import fastclip.distributed as fcd
    from fastclip.adaptive import AutoClip

    own = fcd.Plan(layout=fcd.Layout())
    arrays = [torch.from_numpy(full(f"r{k}.{ctx.rank}", (4,)).astype(np.float32)) for k in (0, 1)]
    clipper = AutoClip(25)
    fcd.clip_with_(clipper, arrays, plan=own)  # one good step first
    state = clipper.state_dict()
    bad = list(arrays)
    if ctx.rank == 1:
        bad[0] = torch.tensor([1.5]).expand(4)  # stride 0: cannot be scaled in place
    before = [_np(a) for a in bad]
    out: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        fcd.clip_with_(clipper, bad, plan=own)
        out["clipper"] = (None, "")
    except Exception as exc:
        out["clipper"] = (type(exc).__name__, str(exc))
    out["clipper_state_unchanged"] = clipper.state_dict() == state
    out["clipper_arrays_unchanged"] = all(np.array_equal(b, _np(a)) for b, a in zip(before, bad))
    params = [torch.nn.Parameter(a.clone()) for a in arrays]
    if ctx.rank == 1:  # two parameters on overlapping memory: refused by the fused step
        base = torch.cat([arrays[0], arrays[1][2:]])
        params = [torch.nn.Parameter(base[0:4]), torch.nn.Parameter(base[2:6])]
    start_values = [_np(p) for p in params]
    opt = fused("adamw", params, own)
    for p, a in zip(params, arrays):
        p.grad = a.clone()
    try:
        opt.step()
        out["fused"] = (None, "")
    except Exception as exc:
        out["fused"] = (type(exc).__name__, str(exc))
    out["fused_unchanged"] = (
        all(np.array_equal(_np(p), v) for p, v in zip(params, start_values)) and not opt.state
    )
    out["seconds"] = time.perf_counter() - start
    return out


def reference_grads(t: int) -> list[np.ndarray]:
    """The full gradients of step t, as every rank's shards assemble to."""
    return [
        (full(grad_name(n), shape) * scale_at(t)).astype(np.float32)
        for n, (shape, _) in ADAPT.items()
    ]


def reference_params() -> list[np.ndarray]:
    return [full(n, shape).astype(np.float32) for n, (shape, _) in ADAPT.items()]


def run_adaptive(rec: _Recorder, ctx: Ctx) -> None:
    for kind in clippers():
        rec.run(f"clipper-{kind}", _clipper_run, ctx, kind)
    rec.run("clipper-pp", _pp_autoclip, ctx)
    for kind in ("adamw", "sgd"):
        rec.run(f"fused-{kind}", _fused_run, ctx, kind)
    rec.run("fused-pp", _fused_pipeline, ctx)
    rec.run("refusals", _refusals, ctx)
