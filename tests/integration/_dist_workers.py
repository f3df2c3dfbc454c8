"""Worker side of test_distributed.py: run in processes spawned by torch.multiprocessing.

Every rank builds its shards of one known global set of arrays, runs every
scenario (collectives in the same order on every rank) and pickles what it
saw to ``outdir/rank{r}.pkl``; the parent process compares with the
single-process float64 NumPy norms of the concatenated full arrays.
"""

from __future__ import annotations

import datetime
import faulthandler
import math
import os
import pickle
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

ORDS: tuple[float, ...] = (1.0, 2.0, math.inf, 3.0)
SHARDED_SIZES = (37, 5, 1, 64, 3, 0)  # 1, 3 and 0 elements: empty shards on most ranks
REPLICATED_SIZES = (4, 2)
FSDP_SHAPES = ((7, 5), (3, 7))  # Linear(5, 7) then Linear(7, 3)


def global_set(dtype: Any, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The full arrays: (sharded ones, replicated ones)."""
    rng = np.random.default_rng(seed)
    sharded = [
        (rng.standard_normal(n) * (k + 1)).astype(dtype) for k, n in enumerate(SHARDED_SIZES)
    ]
    replicated = [rng.standard_normal(n).astype(dtype) for n in REPLICATED_SIZES]
    return sharded, replicated


def bounds(n: int, world: int, k: int) -> list[int]:
    """Uneven contiguous cut points of n elements; rank (k % world) gets an empty shard."""
    weights = np.array([(r + world - k % world) % world for r in range(world)], dtype=np.float64)
    weights = weights * weights + (weights > 0)  # 0, 2, 5, 10...: uneven
    cuts = np.floor(n * np.cumsum(weights) / weights.sum()).astype(int)
    return [0, *cuts.tolist()[:-1], n]


def shards(full: list[np.ndarray], world: int, rank: int) -> list[np.ndarray]:
    out = []
    for k, a in enumerate(full):
        b = bounds(a.size, world, k)
        out.append(a[b[rank] : b[rank + 1]].copy())
    return out


def assemble(per_rank: list[list[np.ndarray]], n_sharded: int) -> list[np.ndarray]:
    """Full arrays back from every rank's local arrays (replicated ones from rank 0)."""
    full = [np.concatenate([r[k] for r in per_rank]) for k in range(n_sharded)]
    return full + list(per_rank[0][n_sharded:])


# ------------------------------------------------------------------ parent


def warm_kernel_cache() -> None:
    """Compile (and cache on disk) every kernel the ranks will use, in this process.

    Otherwise 2-4 freshly spawned ranks compile the same kernels at the same
    moment and race on numba's cache files (numba issue 4807): once here a rank
    died by a signal that way.  Serial and parallel twins, every dtype.
    """
    import torch

    import fastclip
    from fastclip import _config as cfg

    big = cfg.PARALLEL_MIN_ELEMENTS + 1
    for n in (10, big):
        arrays = [np.ones(n, np.float32), np.ones(n, np.float64), np.ones(n, np.float16)]
        arrays += [torch.ones(n, dtype=torch.bfloat16), torch.ones(n, dtype=torch.float16)]
        for p in (1, 2, math.inf, 3):
            for group in ([a for a in arrays if isinstance(a, np.ndarray)], arrays[3:]):
                fastclip.global_norm(group, p)
                fastclip.clip_by_global_norm_(group, 1e30, p)
                fastclip.clip_by_global_norm_(group[:1], 1e30, p)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_and_collect(
    entry: Callable[..., None], world: int, mktemp: Callable[[str], Any]
) -> list[dict[str, Any]]:
    """Run ``entry(rank, world, port, outdir)`` on ``world`` spawned ranks; their results."""
    import torch.multiprocessing as mp

    outdir = mktemp(f"dist{world}")
    warm_kernel_cache()
    try:
        mp.spawn(entry, args=(world, free_port(), str(outdir)), nprocs=world, join=True)
    except mp.ProcessExitedException:
        # A rank killed by a signal (not an exception raised by fastclip or a
        # test: those are pickled and reported) has been seen once, from
        # torch's own C++ threads.  Run the whole group once more on a fresh
        # port; a deterministic crash fails again and is raised.
        outdir = mktemp(f"dist{world}-retry")
        mp.spawn(entry, args=(world, free_port(), str(outdir)), nprocs=world, join=True)
    results = []
    for r in range(world):
        with open(os.path.join(str(outdir), f"rank{r}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    return results


# ------------------------------------------------------------------ worker


class _Recorder:
    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[..., dict[str, Any]], *args: Any) -> None:
        try:
            out = fn(*args)
        except Exception as exc:  # the parent asserts on the type and message
            out = {"error": type(exc).__name__, "message": str(exc)}
        self.results[name] = out


def _np(x: Any) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy().copy()
    return np.asarray(x, dtype=np.float64).copy()


def _local(lib: str, dtype: Any, world: int, rank: int, seed: int = 0) -> list[Any]:
    import torch

    sharded, replicated = global_set(dtype, seed)
    local = shards(sharded, world, rank) + [a.copy() for a in replicated]
    if lib == "torch":
        return [torch.from_numpy(a) for a in local]
    return local


def _norm_and_clip(
    lib: str, dtype: Any, ord: float, world: int, rank: int, by_index: bool
) -> dict[str, Any]:
    import fastclip.distributed as fcd

    n = len(SHARDED_SIZES)
    local = _local(lib, dtype, world, rank)
    repl: list[Any] = [n, n + 1] if by_index else local[n:]
    norm = fcd.global_norm(local, ord, replicated=repl)
    sharded, replicated = global_set(dtype)
    ref = np.linalg.norm(np.concatenate([a.astype(np.float64) for a in sharded + replicated]), ord)
    clipped = fcd.clip_by_global_norm_(local, 0.5 * ref, ord, replicated=repl)
    return {
        "norm": float(norm),
        "norm_type": type(norm).__name__,
        "norm_dtype": str(norm.dtype),
        "clip_norm": float(clipped),
        "arrays": [_np(a) for a in local],
    }


def _nonfinite(world: int, rank: int, ord: float, bad: dict[int, float]) -> dict[str, Any]:
    import torch

    import fastclip.distributed as fcd

    local = _local("torch", np.float32, world, rank)
    culprits: list[int] = []
    if rank in bad:
        k = next(k for k in range(len(SHARDED_SIZES)) if local[k].numel() > 0)
        local[k][0] = bad[rank]
        culprits = [k]
    before = [_np(a) for a in local]
    norm = fcd.global_norm(local, ord, replicated=[6, 7])
    out: dict[str, Any] = {"norm": float(norm), "culprits": culprits}
    try:
        fcd.clip_by_global_norm_(local, 1.0, ord, replicated=[6, 7], error_if_nonfinite=True)
        out["raised"] = None
    except Exception as exc:
        out["raised"] = type(exc).__name__
        out["indices"] = list(getattr(exc, "indices", ()))
        out["message"] = str(exc)
    out["unchanged"] = all(np.array_equal(b, _np(a), equal_nan=True) for b, a in zip(before, local))
    out["is_tensor"] = isinstance(norm, torch.Tensor)
    return out


def _bad(world: int, rank: int, kind: str) -> dict[str, Any]:
    import torch

    import fastclip.distributed as fcd

    local = _local("torch", np.float32, world, rank)
    ord: float = 2.0
    if kind == "count" and rank == 0:
        local = local[1:]  # one array fewer (replicated ones passed as objects below)
    elif kind == "dtype" and rank == world - 1:
        local[0] = local[0].to(torch.float64)
    elif kind == "int" and rank == 1:
        local[0] = torch.zeros(3, dtype=torch.int32)
    elif kind == "ord" and rank == 1:
        ord = 1.0
    elif kind == "index" and rank == 0:
        pass
    before = [_np(a) for a in local]
    repl: list[Any] = [6, 7] if kind != "index" or rank != 0 else [6, 99]
    if kind == "count":
        repl = local[-2:]
    try:
        fcd.clip_by_global_norm_(local, 0.1, ord, replicated=repl)
        raised = None
        message = ""
    except Exception as exc:
        raised = type(exc).__name__
        message = str(exc)
    unchanged = all(np.array_equal(b, _np(a)) for b, a in zip(before, local))
    # the group is still usable after the error: a good call goes through
    after = float(fcd.global_norm(_local("torch", np.float32, world, rank), replicated=[6, 7]))
    return {"raised": raised, "message": message, "unchanged": unchanged, "after": after}


def _extreme(world: int, rank: int, ord: float) -> dict[str, Any]:
    import torch

    import fastclip.distributed as fcd

    local = [torch.full((3,), 1e200 if rank == 0 else 1e-200, dtype=torch.float64)]
    local.append(torch.full((2,), 1e-300, dtype=torch.float64))
    return {"norm": float(fcd.global_norm(local, ord))}


def _mixed_dtypes(world: int, rank: int) -> dict[str, Any]:
    import torch

    import fastclip.distributed as fcd

    local = _local("torch", np.float32, world, rank)
    local[1] = local[1].to(torch.float16)
    local[4] = local[4].to(torch.bfloat16)
    norm = fcd.global_norm(local, replicated=[6, 7])
    return {"norm": float(norm), "arrays": [_np(a) for a in local], "dtype": str(norm.dtype)}


def _dtensor_1d(world: int, rank: int, ord: float) -> dict[str, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastclip.distributed as fcd

    mesh = init_device_mesh("cpu", (world,))
    sharded, replicated = global_set(np.float32)
    dts = [distribute_tensor(torch.from_numpy(a.copy()), mesh, [Shard(0)]) for a in sharded]
    dts += [distribute_tensor(torch.from_numpy(a.copy()), mesh, [Replicate()]) for a in replicated]
    norm = fcd.global_norm(dts, ord)
    assert [t.data_ptr() for t in fcd.local_tensors(dts)] == [d.to_local().data_ptr() for d in dts]
    assert fcd.has_dtensor(dts) and not fcd.has_dtensor(fcd.local_tensors(dts))
    ref = np.linalg.norm(np.concatenate([a.astype(np.float64) for a in sharded + replicated]), ord)
    total = fcd.clip_grad_norm_(dts, 0.5 * ref, ord)
    return {
        "norm": float(norm),
        "total_type": type(total).__name__,
        "total_placements": str(getattr(total, "placements", None)),
        "total": float(total.full_tensor()),
        "arrays": [_np(d.full_tensor()) for d in dts],
        "local_sizes": [int(d.to_local().numel()) for d in dts],
    }


def _dtensor_16bit(world: int, rank: int, dtype_name: str) -> dict[str, Any]:
    """16-bit DTensor gradients through ``fastclip.torch`` and ``torch.nn.utils`` on the
    same mesh: torch's norm dtype and value; and gradients whose float64 norm is finite
    but beyond float16's range, with ``error_if_nonfinite=True``."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import fastclip.torch as fct

    dtype = getattr(torch, dtype_name)
    mesh = init_device_mesh("cpu", (world,))
    sharded, _ = global_set(np.float32)
    out: dict[str, Any] = {}
    for who, fn in (("fastclip", fct.clip_grad_norm_), ("torch", torch.nn.utils.clip_grad_norm_)):
        ps = []
        for a in sharded:
            p = torch.nn.Parameter(torch.zeros(a.shape, dtype=dtype))
            p.grad = distribute_tensor(torch.from_numpy(a.copy()).to(dtype), mesh, [Shard(0)])
            ps.append(p)
        total = fn(ps, 0.5)
        out[who] = {
            "dtype": str(total.dtype),
            "type": type(total).__name__,
            "total": float(total.full_tensor()),
            "grads": [_np(p.grad.full_tensor()) for p in ps],
        }
        big = distribute_tensor(torch.full((64,), 2e4, dtype=dtype), mesh, [Shard(0)])
        q = torch.nn.Parameter(torch.zeros(64, dtype=dtype))
        q.grad = big
        try:
            fn([q], 1.0, error_if_nonfinite=True)
            out[who + "-big"] = "no error"
        except RuntimeError as exc:
            out[who + "-big"] = type(exc).__name__
        out[who + "-big-unchanged"] = bool((q.grad.full_tensor() == 2e4).all())
    return out


def _dtensor_2d(world: int, rank: int) -> dict[str, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastclip.distributed as fcd

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    rng = np.random.default_rng(5)
    fulls = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(4)]
    placements = [
        [Shard(0), Replicate()],
        [Replicate(), Shard(1)],
        [Shard(0), Shard(1)],
        [Replicate(), Replicate()],
    ]
    dts = [
        distribute_tensor(torch.from_numpy(a.copy()), mesh, pl) for a, pl in zip(fulls, placements)
    ]
    out = {"norm2": float(fcd.global_norm(dts)), "norm1": float(fcd.global_norm(dts, 1))}
    ref = float(np.linalg.norm(np.concatenate([a.ravel().astype(np.float64) for a in fulls])))
    fcd.clip_by_global_norm_(dts, 0.25 * ref)
    out["arrays"] = [_np(d.full_tensor()) for d in dts]
    return out


def _dtensor_partial(world: int, rank: int) -> dict[str, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    import fastclip.distributed as fcd

    mesh = init_device_mesh("cpu", (world,))
    d = DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False)
    return {"norm": float(fcd.global_norm([d]))}


def fsdp_model(seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def fsdp_input(seed: int = 1) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.randn(4, 5)


def fully_sharded(model: Any, world: int) -> Any:
    """FSDP2: ``fully_shard`` each layer with parameters, then the model, on a 1-D CPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp(world: int, rank: int, max_norm: float) -> dict[str, Any]:
    import fastclip.distributed as fcd

    model = fully_sharded(fsdp_model(), world)
    (model(fsdp_input()) ** 2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = fcd.clip_grad_norm_(grads, max_norm)
    return {
        "total": float(total.full_tensor()),
        "total_type": type(total).__name__,
        "grads": [_np(g.full_tensor()) for g in grads],
        "local_sizes": [int(g.to_local().numel()) for g in grads],
    }


# ----------------------------------------------- refusals (data safety, issue 13)

#: kind -> (library, ranks that refuse): every scenario of ``run_safety_suite``.
REFUSALS: dict[str, tuple[str, tuple[int, ...]]] = {
    "readonly-numpy": ("numpy", (1,)),
    "stride0-numpy": ("numpy", (1,)),
    "overlap-numpy": ("numpy", (1,)),
    "twice-numpy": ("numpy", (1,)),
    "readonly-replicated-numpy": ("numpy", (1,)),
    "expanded-torch": ("torch", (1,)),
    "overlap-torch": ("torch", (1,)),
    "expanded-rank0-torch": ("torch", (0,)),
    "both-torch": ("torch", (0, 1)),
}
REFUSAL_MAX_NORM = 0.1  # far below the global norm (about 50): a clip would change every value


def _owner_bytes(owners: list[Any]) -> list[bytes]:
    """Every byte of the memory behind the arrays (the whole storage for torch views)."""
    import torch

    return [
        bytes(o.untyped_storage()) if isinstance(o, torch.Tensor) else o.tobytes() for o in owners
    ]


def refusal_arrays(kind: str, world: int, rank: int) -> tuple[list[Any], list[Any]]:
    """(the local arrays passed, the arrays owning all of their memory) for one scenario."""
    import torch
    from numpy.lib.stride_tricks import as_strided

    lib, culprits = REFUSALS[kind]
    local = _local(lib, np.float32, world, rank)
    owners = list(local)
    if rank not in culprits:
        return local, owners
    if kind == "readonly-numpy":
        local[2].flags.writeable = False
    elif kind == "stride0-numpy":
        one = np.array([1.5], np.float32)
        local[0] = as_strided(one, shape=(4,), strides=(0,))  # writeable, 4 elements, 1 float
        owners[0] = one
    elif kind in ("overlap-numpy", "overlap-torch"):
        buf = np.arange(12, dtype=np.float32)
        owner: Any = buf if lib == "numpy" else torch.from_numpy(buf)
        local[0], local[1] = owner[0:8], owner[4:12]
        owners[0], owners[1] = owner, owner
    elif kind == "twice-numpy":
        local[3] = local[0]
        owners[3] = local[0]
    elif kind == "readonly-replicated-numpy":
        local[6].flags.writeable = False  # counted on rank 0 only: still written on rank 1
    elif kind in ("expanded-torch", "expanded-rank0-torch", "both-torch"):
        one = torch.tensor([1.5])
        local[0] = one.expand(4)
        owners[0] = one
    return local, owners


def _refusal(world: int, rank: int, kind: str, strict: bool, via: str) -> dict[str, Any]:
    import fastclip.distributed as fcd

    local, owners = refusal_arrays(kind, world, rank)
    before = _owner_bytes(owners)
    try:
        if via == "clip_grad_norm_":
            fcd.clip_grad_norm_(local, REFUSAL_MAX_NORM)
        else:
            fcd.clip_by_global_norm_(local, REFUSAL_MAX_NORM, replicated=[6, 7], strict=strict)
        raised, message = None, ""
    except Exception as exc:
        raised, message = type(exc).__name__, str(exc)
    unchanged = _owner_bytes(owners) == before
    # The group is still usable, and a good call clips: compared with float64 NumPy by the parent.
    good = _local(REFUSALS[kind][0], np.float32, world, rank)
    norm = fcd.clip_by_global_norm_(good, REFUSAL_MAX_NORM, replicated=[6, 7], strict=strict)
    return {
        "raised": raised,
        "message": message,
        "unchanged": unchanged,
        "after_norm": float(norm),
        "after_arrays": [_np(a) for a in good],
    }


def run_safety_suite(rank: int, world: int, port: int, outdir: str) -> None:
    """Entry point of every spawned rank of tests/integration/test_safety_distributed.py."""
    _run(rank, world, port, outdir, _safety_scenarios)


def _safety_scenarios(rec: _Recorder, world: int, rank: int) -> None:
    for kind, (lib, _) in REFUSALS.items():
        for strict in (True, False):
            rec.run(f"{kind}-strict{strict}", _refusal, world, rank, kind, strict, "clip")
        if lib == "torch":
            rec.run(f"{kind}-grad", _refusal, world, rank, kind, True, "clip_grad_norm_")


def run_suite(rank: int, world: int, port: int, outdir: str) -> None:
    """Entry point of every spawned rank of tests/integration/test_distributed.py."""
    _run(rank, world, port, outdir, _scenarios)


def _run(
    rank: int, world: int, port: int, outdir: str, scenarios: Callable[[_Recorder, int, int], None]
) -> None:
    import torch
    import torch.distributed as dist

    faulthandler.dump_traceback_later(150, exit=True)  # never hang the test suite
    warnings.simplefilter("ignore")  # torch's deprecation chatter in the workers
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    rec = _Recorder()
    try:
        scenarios(rec, world, rank)
    except BaseException:
        rec.results["__crash__"] = {"error": "crash", "message": traceback.format_exc()}
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(rec.results, f)
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
    # Leave without interpreter teardown: in CI a rank once died at exit with
    # "terminate called without an active exception" (SIGABRT) from a C++
    # thread of torch's distributed stack still joinable during static
    # destruction, after its results were written.  Results are on disk, so
    # skip the teardown rather than let it turn a passing run into an error.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _scenarios(rec: _Recorder, world: int, rank: int) -> None:
    for lib in ("torch", "numpy"):
        for dtype in (np.float32, np.float64):
            for ord in ORDS:
                for by_index in (False, True) if ord == 2.0 else (lib == "numpy",):
                    name = f"clip-{lib}-{np.dtype(dtype).name}-{ord}-{by_index}"
                    rec.run(
                        name,
                        _norm_and_clip,
                        lib,
                        dtype,
                        ord,
                        world,
                        rank,
                        by_index,
                    )
    for ord in (1.0, 2.0, math.inf):
        rec.run(f"nan-{ord}", _nonfinite, world, rank, ord, {1: math.nan})
        rec.run(f"inf-{ord}", _nonfinite, world, rank, ord, {world - 1: math.inf})
        rec.run(
            f"naninf-{ord}",
            _nonfinite,
            world,
            rank,
            ord,
            {0: math.inf, world - 1: math.nan},
        )
    for kind in ("count", "dtype", "int", "ord", "index"):
        rec.run(f"bad-{kind}", _bad, world, rank, kind)
    for ord in (2.0, 3.0, 1.0, math.inf):
        rec.run(f"extreme-{ord}", _extreme, world, rank, ord)
    rec.run("mixed", _mixed_dtypes, world, rank)
    for ord in (2.0, 1.0, math.inf):
        rec.run(f"dtensor1d-{ord}", _dtensor_1d, world, rank, ord)
    if world % 2 == 0 and world >= 4:
        rec.run("dtensor2d", _dtensor_2d, world, rank)
    rec.run("dtensor-partial", _dtensor_partial, world, rank)
    for name in ("float16", "bfloat16"):
        rec.run(f"dtensor-{name}", _dtensor_16bit, world, rank, name)
    rec.run("fsdp", _fsdp, world, rank, 0.05)
