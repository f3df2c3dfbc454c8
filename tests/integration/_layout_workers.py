"""Worker side of test_distributed_layouts.py: parallel layouts on spawned gloo ranks.

Every rank builds its part of one known model (the full arrays come from
:func:`full`, seeded by name, so the parent rebuilds them), runs every
scenario in the same order (collectives in step on every rank) and pickles
what it saw.  Meshes: ``dp x tp`` and ``dp x ep`` (2-D), ``pp x tp`` (4
ranks) and ``pp x dp x tp`` (8 ranks, 3-D); the parent compares with the
single-process float64 norm of the full, de-duplicated arrays.
"""

from __future__ import annotations

import math
import time
import zlib
from typing import Any

import numpy as np
from _dist_workers import _np, _Recorder, _run

ORDS = (1.0, 2.0, math.inf, 3.0)

#: dp x tp DTensors: name -> (full shape, placements over (dp, tp)); 5 rows over 4 tp
#: ranks and 3 over 2 dp ranks leave uneven and empty shards.
DENSE = {
    "q": ((6, 4), ("S0", "S0")),
    "o": ((4, 6), ("S0", "S1")),
    "ln": ((4,), ("R", "R")),
    "mlp": ((5, 4), ("R", "S0")),
    "b": ((3,), ("S0", "R")),
}
#: dp x ep DTensors (experts stacked on axis 0, sharded over ep, FSDP-sharded over edp).
EXPERTS = {
    "experts": ((4, 3, 2), ("S1", "S0")),
    "ebias": ((4, 3), ("R", "S0")),
}
#: pipeline stages: name -> (shape, kind); "emb" and "head" are tied (the same values).
STAGES = (
    {"emb": ((6, 4), "tp"), "s0.w": ((4, 4), "tp"), "s0.ln": ((4,), "rep")},
    {"s1.w1": ((4, 4), "tp"), "s1.w2": ((5, 3), "tp"), "s1.ln": ((4,), "rep"), "head": None},
)


def full(name: str, shape: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
    """The full array of a parameter (or gradient), the same in every process."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return (rng.standard_normal(shape) * (1 + len(name) % 3)).astype(dtype)


def stage_items(stage: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of a stage's parameters; the head is the embedding (tied)."""
    out = []
    for name, spec in STAGES[stage].items():
        shape, kind = STAGES[0]["emb"] if spec is None else spec
        out.append((name, shape, kind))
    return out


def unique_model(dtype: Any = np.float64) -> list[np.ndarray]:
    """The pipeline model's arrays, de-duplicated (the tied head is the embedding)."""
    return [
        full(name, shape).astype(dtype)
        for stage in range(len(STAGES))
        for name, shape, _ in stage_items(stage)
        if name != "head"
    ]


def mesh_shapes(world: int) -> dict[str, tuple[int, ...]]:
    return {
        "dense": (2, world // 2),
        "experts": (world // 2, 2),
        "pp": (2, world // 2) if world < 8 else (2, 2, 2),
    }


def _placements(codes: tuple[str, ...]) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if c == "R" else Shard(int(c[1:])) for c in codes]


def _dtensors(spec: dict[str, Any], mesh: Any, dtype: Any = np.float32, scale: float = 1.0):
    import torch
    from torch.distributed.tensor import distribute_tensor

    out = []
    for name, (shape, codes) in spec.items():
        t = torch.from_numpy((full(name, shape) * scale).astype(dtype))
        out.append(distribute_tensor(t, mesh, _placements(codes), src_data_rank=None))
    return out


class Ctx:
    """The meshes and groups of one world, made once (new_group is collective)."""

    def __init__(self, world: int) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        shapes = mesh_shapes(world)
        self.world = world
        self.rank = dist.get_rank()
        self.dense = init_device_mesh("cpu", shapes["dense"], mesh_dim_names=("dp", "tp"))
        self.experts = init_device_mesh("cpu", shapes["experts"], mesh_dim_names=("edp", "ep"))
        names = ("pp", "tp") if world < 8 else ("pp", "dp", "tp")
        self.pp = init_device_mesh("cpu", shapes["pp"], mesh_dim_names=names)
        self.stage = self.pp.get_local_rank("pp")
        self.pp_group = self.pp["pp"].get_group()
        self.tp = self.pp["tp"]
        self.dp = self.pp["dp"] if world >= 8 else None
        self.splits = {k: dist.new_group(list(range(k))) for k in (1, 2, 4, 8) if k <= world}


# ------------------------------------------------------------------ scenarios


def _mesh_norms(ctx: Ctx, ords: tuple[float, ...] = ORDS) -> dict[str, Any]:
    """Dense (dp, tp) and expert (dp, ep) DTensors on two meshes, one call."""
    import fastclip.distributed as fcd

    dense = _dtensors(DENSE, ctx.dense)
    experts = _dtensors(EXPERTS, ctx.experts)
    out: dict[str, Any] = {}
    for ord in ords:
        out[f"dense-{ord}"] = float(fcd.global_norm(dense, ord))
        out[f"moe-{ord}"] = float(fcd.global_norm(dense + experts, ord))
    both = dense + experts
    out["clip_norm"] = float(fcd.clip_by_global_norm_(both, 0.5 * out["moe-2.0"]))
    out["clipped"] = [_np(d.full_tensor()) for d in both]
    out["local_sizes"] = [int(d.to_local().numel()) for d in both]
    out["total_type"] = type(fcd.clip_grad_norm_(dense, 1e9)).__name__
    return out


def _pp_local(ctx: Ctx, dtensor: bool, dtype: Any = np.float32) -> tuple[list[Any], Any, Any]:
    """This rank's stage arrays (tp shards or whole), their layouts and ties."""
    import torch
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastclip.distributed as fcd

    tp_rank, tp_size = ctx.tp.get_local_rank(), ctx.tp.size()
    dp = [ctx.dp] if ctx.dp is not None else []
    sub = ctx.pp["dp", "tp"] if ctx.dp is not None else ctx.tp
    arrays, layouts, tied = [], [], []
    for name, shape, kind in stage_items(ctx.stage):
        values = full("emb" if name == "head" else name, shape).astype(dtype)
        if dtensor:
            codes = [Replicate()] * (sub.ndim - 1) + [Shard(0) if kind == "tp" else Replicate()]
            t = torch.from_numpy(values)
            arrays.append(distribute_tensor(t, sub, codes, src_data_rank=None))
            layouts.append(fcd.Layout())  # the other stages hold other arrays
        else:
            t = torch.from_numpy(values)
            if kind == "tp":
                arrays.append(torch.chunk(t, tp_size)[tp_rank].clone())
                layouts.append(fcd.Layout(replicated_over=dp, sharded_over=[ctx.tp]))
            else:
                arrays.append(t.clone())
                layouts.append(fcd.Layout(replicated_over=[*dp, ctx.tp]))
        if name in ("emb", "head"):
            tied.append((arrays[-1], ctx.pp_group))
    return arrays, layouts, tied


def _pipeline(ctx: Ctx, dtensor: bool) -> dict[str, Any]:
    import fastclip.distributed as fcd

    out: dict[str, Any] = {}
    for ord in ORDS:
        arrays, layouts, tied = _pp_local(ctx, dtensor)
        out[f"norm-{ord}"] = float(fcd.global_norm(arrays, ord, layout=layouts, tied=tied))
    for dtype in (np.float64, np.float32):
        arrays, layouts, tied = _pp_local(ctx, dtensor, dtype)
        out[f"norm-{np.dtype(dtype).name}"] = float(
            fcd.global_norm(arrays, layout=layouts, tied=tied)
        )
    # untied, the head counts again: the sqrt(2)-style inflation of Megatron-LM PR 7228
    arrays, layouts, _ = _pp_local(ctx, dtensor)
    out["untied"] = float(fcd.global_norm(arrays, layout=layouts))
    arrays, layouts, tied = _pp_local(ctx, dtensor)
    before = [_np(a.to_local() if dtensor else a) for a in arrays]
    out["clip_norm"] = float(fcd.clip_by_global_norm_(arrays, 1.0, layout=layouts, tied=tied))
    after = [_np(a.to_local() if dtensor else a) for a in arrays]
    out["ratios"] = [float(np.sum(a) / np.sum(b)) for a, b in zip(after, before) if b.size]
    return out


def _fsdp_tp_model(seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)
    )


def fsdp_tp_input() -> Any:
    import torch

    torch.manual_seed(1)
    return torch.randn(3, 4)


def _fsdp_tp(ctx: Ctx) -> dict[str, Any]:
    """FSDP2 over dp on top of tensor parallel over tp (2-D DTensors); the LayerNorm,
    left out of TP, becomes a 1-D DTensor on the dp mesh: replicated over tp."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import fastclip.distributed as fcd

    model = _fsdp_tp_model()
    parallelize_module(model, ctx.dense["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for layer in (model[0], model[2], model[3]):
        fully_shard(layer, mesh=ctx.dense["dp"])
    fully_shard(model, mesh=ctx.dense["dp"])
    (model(fsdp_tp_input()) ** 2).sum().backward()
    grads = [p.grad for p in model.parameters()]
    tp_group = ctx.dense["tp"].get_group()
    layout = {g: fcd.Layout(replicated_over=[tp_group]) for g in grads if g.device_mesh.ndim == 1}
    naive = float(fcd.global_norm(grads, layout={g: fcd.Layout() for g in layout}))
    total = fcd.clip_by_global_norm_(grads, 0.05, layout=layout)
    return {
        "total": float(total),
        "naive": naive,  # the LayerNorm counted on every tp rank: inflated
        "mesh_dims": [g.device_mesh.ndim for g in grads],
        "grads": [_np(g.full_tensor()) for g in grads],
    }


def _ties_on_one_rank(ctx: Ctx) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import fastclip.distributed as fcd
    from fastclip.distributed._devices import choose, group_device_types

    w = torch.from_numpy(full("tie", (5,)).astype(np.float32))
    other = torch.from_numpy(full("other", (3,)).astype(np.float32))
    views = [w, other, w, w.view(5), w[:3]]  # w twice, w's storage as a view, a part of w
    every = fcd.Layout(replicated_over=[dist.group.WORLD])  # each rank holds them all
    return {
        "twice": float(fcd.global_norm(views[:4], layout=every)),
        "part": float(fcd.global_norm(views, layout=every)),
        "replicated": float(fcd.global_norm(views[:4], replicated=[0, 1, 2, 3])),
        "row_device": str(choose([w], None)),  # CPU tensors on gloo: the row stays on the CPU
        "types": sorted(group_device_types(None)),
    }


def _nonfinite(ctx: Ctx, value: float) -> dict[str, Any]:
    import fastclip.distributed as fcd

    dense = _dtensors(DENSE, ctx.dense)
    experts = _dtensors(EXPERTS, ctx.experts)
    if ctx.rank == 1:  # "q" is sharded on both mesh dims: rank 1's rows count on rank 1
        dense[0].to_local().view(-1)[0] = value
    both = dense + experts
    before = [_np(d.to_local()) for d in both]
    out: dict[str, Any] = {"norm": float(fcd.global_norm(both))}
    try:
        fcd.clip_by_global_norm_(both, 1.0, error_if_nonfinite=True)
        out["raised"] = None
    except Exception as exc:
        out["raised"] = type(exc).__name__
    out["unchanged"] = all(
        np.array_equal(b, _np(d.to_local()), equal_nan=True) for b, d in zip(before, both)
    )
    return out


def _bad(ctx: Ctx, kind: str) -> dict[str, Any]:
    import torch

    import fastclip.distributed as fcd

    culprit = 1
    layout: Any = None
    tied: Any = None
    if kind.startswith("mesh"):
        arrays = _dtensors(DENSE, ctx.dense) + _dtensors(EXPERTS, ctx.experts)
        if ctx.rank == culprit:
            if kind == "mesh-count":
                arrays = arrays[1:]
            elif kind == "mesh-dtype":
                arrays[2] = arrays[2].to(torch.float64)
            elif kind == "mesh-other":  # "b" on the expert mesh on this rank only
                arrays[4] = _dtensors({"b": DENSE["b"]}, ctx.experts)[0]
    else:
        arrays, layouts, ties = _pp_local(ctx, dtensor=False)
        layout, tied = layouts, ties
        if ctx.rank == culprit:
            if kind == "tie":
                tied = []  # its partner on the other stage still marks the tie
            elif kind == "layout-count":
                arrays, layout = arrays[:-1], layout[:-1]
                tied = [t for t in ties if any(t[0] is a for a in arrays)]
            elif kind == "layout-type":
                layout = ["replicated"] * len(arrays)
    before = [_np(a.to_local() if hasattr(a, "to_local") else a) for a in arrays]
    start = time.perf_counter()
    try:
        fcd.clip_by_global_norm_(arrays, 1e-3, layout=layout, tied=tied)
        raised, message = None, ""
    except Exception as exc:
        raised, message = type(exc).__name__, str(exc)
    elapsed = time.perf_counter() - start
    after = [_np(a.to_local() if hasattr(a, "to_local") else a) for a in arrays]
    good = _dtensors(DENSE, ctx.dense)
    return {
        "raised": raised,
        "message": message,
        "seconds": elapsed,
        "unchanged": all(np.array_equal(b, a) for b, a in zip(before, after)),
        "after": float(fcd.global_norm(good)),
    }


def split_model() -> list[np.ndarray]:
    return [full(f"split{k}", (n,)) for k, n in enumerate((37, 5, 1, 64, 3, 0, 19))]


def _splits(ctx: Ctx) -> dict[str, Any]:
    """The same arrays split 1, 2, 4 (and 8) ways over sub-groups: float64, float32, bf16."""
    import torch
    from _dist_workers import bounds

    import fastclip.distributed as fcd

    out: dict[str, Any] = {}
    for k, group in ctx.splits.items():
        if ctx.rank >= k:
            continue
        for dtype in ("float64", "float32", "bfloat16"):
            parts = []
            for i, a in enumerate(split_model()):
                b = bounds(a.size, k, i)
                t = torch.from_numpy(a[b[ctx.rank] : b[ctx.rank + 1]].copy())
                parts.append(t.to(getattr(torch, dtype)))
            for ord in (2.0, 1.0):
                norm = fcd.global_norm(parts, ord, group=group)
                out[f"{k}-{dtype}-{ord}"] = (float(norm), str(norm.dtype))
    return out


def run_layouts(rank: int, world: int, port: int, outdir: str) -> None:
    """Entry point of every spawned rank of test_distributed_layouts.py."""
    _run(rank, world, port, outdir, _scenarios)


def _scenarios(rec: _Recorder, world: int, rank: int) -> None:
    from _layout_adaptive import run_adaptive

    ctx = Ctx(world)
    rec.run("meshes", _mesh_norms, ctx)
    rec.run("pp-plain", _pipeline, ctx, False)
    rec.run("pp-dtensor", _pipeline, ctx, True)
    rec.run("fsdp-tp", _fsdp_tp, ctx)
    rec.run("ties", _ties_on_one_rank, ctx)
    for name, value in (("nan", math.nan), ("inf", math.inf)):
        rec.run(f"nonfinite-{name}", _nonfinite, ctx, value)
    if world >= 4:  # a tensor-parallel partner to disagree with
        for kind in BAD_KINDS:
            rec.run(f"bad-{kind}", _bad, ctx, kind)
    rec.run("splits", _splits, ctx)
    run_adaptive(rec, ctx)


BAD_KINDS = ("mesh-count", "mesh-dtype", "mesh-other", "tie", "layout-count", "layout-type")
