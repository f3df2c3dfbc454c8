"""What :mod:`fastclip.distributed` reduces: shard accounting, the one all_gather, the combination.

:func:`reduce_norms` unwraps DTensors and decides what this rank counts,
checks the arrays (before the gather, for in-place calls), computes the local
norm, gathers one float64 row per rank (norm, error flag, signature, refusal
reason), checks the rows and combines the ranks' norms without over- or
underflow.  The package docstring explains the row and why it is one gather.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fastclip import _api, _dispatch
from fastclip._validate import check_eps, check_max_norm, check_ord

__all__ = ["OP_CLIP", "OP_NORM", "Reduced", "dtensor_class", "reduce_norms", "result_array"]

# Columns of the gathered row.
_NORM, _ERROR, _OP, _COUNT, _DTYPES, _REPL, _ORD, _MAX_NORM, _EPS = range(9)
_REASON = 9  # first column of the refusing rank's error text
_REASON_BYTES = 160  # 20 float64 columns: enough for the error's type and its first sentence
_WIDTH = _REASON + _REASON_BYTES // 8
OP_NORM, OP_CLIP = 1.0, 2.0  # the function called, a column of the row
_SIGNATURE_NAMES = {
    _OP: "the function called (global_norm / clip_by_global_norm_)",
    _COUNT: "the number of arrays",
    _DTYPES: "the dtypes of the arrays",
    _REPL: "the replicated arrays (positions and shapes)",
    _ORD: "ord",
    _MAX_NORM: "max_norm",
    _EPS: "eps",
}


def dtensor_class() -> Any:
    """torch's DTensor class, or None when its module was never imported (no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def dtensor_local(a: Any) -> tuple[Any, bool]:
    """A DTensor's local tensor and whether this rank counts it: not when a
    ``Replicate`` placement puts the same values on a lower rank of that mesh
    dimension.  A ``Partial`` placement is refused (NotImplementedError)."""
    counts = True
    mesh = a.device_mesh
    for dim, placement in enumerate(a.placements):
        if placement.is_partial():
            raise NotImplementedError(
                f"DTensor with a Partial placement ({placement}) on mesh dim {dim}: its "
                "local tensor is a pending reduction, whose norm is not the norm of the "
                "parts; redistribute it to Shard or Replicate first"
            )
        if placement.is_replicate() and mesh.get_local_rank(dim) != 0:
            counts = False  # another rank of this mesh dim holds the same values
    return a.to_local(), counts


class _Local:
    """One rank's view of a call: the local arrays and what it counts."""

    def __init__(self) -> None:
        self.arrays: list[Any] = []  # local arrays (DTensors unwrapped): what gets scaled
        self.counted: list[Any] = []  # what enters this rank's share of the norm
        self.meshes: list[Any] = []  # the device meshes of DTensor inputs
        self.wide = False  # any float64/complex128 array: the result is float64


def _unwrap(arrays: list[Any], replicated: Sequence[Any], rank_in_group: int) -> _Local:
    dtensor = dtensor_class()
    repl_idx: set[int] = set()
    for item in replicated:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            i = int(item)
            if not -len(arrays) <= i < len(arrays):
                raise IndexError(f"replicated index {i} out of range for {len(arrays)} arrays")
            repl_idx.add(i % len(arrays))
        else:
            matches = [k for k, a in enumerate(arrays) if a is item]
            if not matches:
                raise ValueError(
                    "every array in `replicated` must also be one of `local_arrays` "
                    "(the same object), or an index into them"
                )
            repl_idx.update(matches)
    loc = _Local()
    for k, a in enumerate(arrays):
        counts = k not in repl_idx or rank_in_group == 0
        if dtensor is not None and isinstance(a, dtensor):
            loc.meshes.append(a.device_mesh)
            a, mine = dtensor_local(a)
            counts = counts and mine
        loc.arrays.append(a)
        if counts:
            loc.counted.append(a)
    return loc


def _signature(loc: _Local, replicated_pattern: str) -> tuple[float, float]:
    dtypes = ",".join(str(a.dtype) for a in loc.arrays)
    return float(zlib.crc32(dtypes.encode())), float(zlib.crc32(replicated_pattern.encode()))


def _is_wide(a: Any) -> bool:
    return str(a.dtype).rsplit(".", 1)[-1] in ("float64", "complex128")


def _check_targets(arrays: list[Any]) -> Any:
    """Every check the in-place clip makes before its first write, made now.

    Run before the gather so that a refusal travels in it (see "Refusals are
    collective" in the :mod:`fastclip.distributed` docstring).  Returns the
    CPU route's packed tables (to reuse for the norm) or None.
    """
    if not arrays:
        return None
    return _dispatch.backend_for(arrays).check_targets(arrays, "clip_by_global_norm")


def _local_norm(counted: list[Any], ord_code: int, p: float, packed: Any = None) -> Any:
    """This rank's norm as a float (CPU) or a float64 0-d device tensor (GPU).

    ``packed``: the CPU tables of exactly ``counted``, already built and checked.
    """
    if not counted:
        return 0.0
    # The CPU route's float64 norm: over/underflow-safe, not rounded to the dtype.
    exact = _dispatch.backend_for(counted).norm64(counted, ord_code, p, packed)
    if exact is not None:
        return float(exact)
    value = _api.global_norm(counted, math.inf if ord_code == 0 else p)
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return float(value)  # another library: read on the host


def _device(loc: _Local, group: Any) -> torch.device:
    for a in loc.arrays:
        if isinstance(a, torch.Tensor):
            return a.device
    if loc.arrays or "nccl" not in str(dist.get_backend(group)).lower():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _resolve_group(group: Any, arrays: list[Any]) -> Any:
    """The process group: given, else the mesh's (one 1-D mesh), else the default group."""
    if group is not None:
        return group
    dtensor = dtensor_class()
    if dtensor is None:
        return None
    meshes = {id(a.device_mesh): a.device_mesh for a in arrays if isinstance(a, dtensor)}
    if len(meshes) == 1:
        mesh = next(iter(meshes.values()))
        if mesh.ndim == 1:
            return mesh.get_group()
    return None


def _check_meshes(loc: _Local, group: Any) -> None:
    if not loc.meshes:
        return
    ranks = sorted(dist.get_process_group_ranks(group or dist.group.WORLD))
    for mesh in {id(m): m for m in loc.meshes}.values():
        mesh_ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
        if mesh_ranks != ranks:
            raise ValueError(
                f"a DTensor's device mesh spans ranks {mesh_ranks} but the reduction group "
                f"spans {ranks}: pass the group of the mesh (or one covering exactly its ranks)"
            )


def _gather(row: torch.Tensor, group: Any) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty(world * _WIDTH, dtype=torch.float64, device=row.device)
    gather = getattr(dist, "all_gather_single", None)  # torch >= 2.13; the older name warns
    if gather is not None:
        gather(out, row, group=group)
    else:  # pragma: no cover - older torch
        dist.all_gather_into_tensor(out, row, group=group)
    return out.view(world, _WIDTH)


def _reason_bytes(error: BaseException) -> bytes:
    """The start of ``"TypeName: message"`` in UTF-8, cut on a character boundary."""
    text = f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:_REASON_BYTES]
    return text.decode("utf-8", "ignore").encode("utf-8")


def _reason_of(row: np.ndarray) -> str:
    raw = np.ascontiguousarray(row[_REASON:_WIDTH]).view(np.uint8).tobytes()
    text = raw.rstrip(b"\0").decode("utf-8", "replace")
    cut = len(raw.rstrip(b"\0")) == _REASON_BYTES
    return text + ("..." if cut else "")


def _check_rows(rows: np.ndarray, own_error: BaseException | None) -> None:
    """Raise the same decision on every rank: a failed rank, or different signatures."""
    failed = [int(r) for r in np.flatnonzero(rows[:, _ERROR] != 0)]
    if failed:
        if own_error is not None:
            raise own_error
        reasons = "; ".join(f"rank {r}: {_reason_of(rows[r]) or 'no reason sent'}" for r in failed)
        raise ValueError(
            f"fastclip.distributed: rank(s) {failed} of the group rejected their input "
            f"({reasons}); nothing was modified on any rank"
        )
    for col, what in _SIGNATURE_NAMES.items():
        values = rows[:, col]
        if not np.all(values == values[0]):
            raise ValueError(
                f"fastclip.distributed: the ranks of the group disagree on {what}: "
                f"{values.tolist()} by rank; every rank must pass the same number of arrays, "
                "with the same dtypes, and the same arguments; nothing was modified"
            )


def _combine(norms: torch.Tensor, ord_code: int, p: float) -> torch.Tensor:
    """The global norm from the ranks' norms, on their device (NaN and inf propagate)."""
    m = norms.amax()  # torch's amax propagates NaN
    if ord_code == 0:
        return m
    ok = torch.isfinite(m) & (m > 0)
    scale = torch.where(ok, m, torch.ones_like(m))
    s = torch.sum(torch.pow(norms / scale, p))
    total = scale * (
        torch.sqrt(s) if ord_code == 2 else s if ord_code == 1 else torch.pow(s, 1.0 / p)
    )
    return torch.where(ok, total, m)  # 0, inf or NaN: the max says it all


class Reduced:
    """The global norm of one call and this rank's view of it."""

    def __init__(self, total: torch.Tensor, loc: _Local, ord_code: int, p: float, group: Any):
        self.total = total  # float64 0-d, on the arrays' device
        self.loc = loc
        self.ord_code = ord_code
        self.p = p
        self.group = group


def reduce_norms(
    local_arrays: Any,
    ord: Any,
    group: Any,
    replicated: Any,
    op: float,
    max_norm: Any,
    eps: Any,
    strict: bool,
) -> Reduced:
    arrays = _dispatch.as_array_list(local_arrays)
    group = _resolve_group(group, arrays)
    rank = dist.get_rank(group)
    error: BaseException | None = None
    loc = _Local()
    ord_code, p = 2, 2.0
    c = e = 0.0
    norm: Any = 0.0
    dtypes_sig = repl_sig = 0.0
    try:
        ord_code, p = check_ord(ord)
        if op == OP_CLIP:
            c, e = check_max_norm(max_norm), check_eps(eps)
        repl = list(replicated) if isinstance(replicated, (list, tuple, set)) else [replicated]
        loc = _unwrap(arrays, repl, rank)
        _check_meshes(loc, group)
        loc.wide = any(_is_wide(a) for a in loc.arrays)
        repl_positions = sorted(
            {i % len(arrays) for i in repl if isinstance(i, (int, np.integer))}
            | {k for k, a in enumerate(arrays) for r in repl if a is r}
        )
        pattern = ";".join(f"{k}:{tuple(loc.arrays[k].shape)}" for k in repl_positions)
        dtypes_sig, repl_sig = _signature(loc, pattern)
        packed = _check_targets(loc.arrays) if op == OP_CLIP else None
        if packed is not None and len(loc.counted) != len(loc.arrays):
            packed = None  # replicated arrays not counted here: pack the counted ones
        norm = _local_norm(loc.counted, ord_code, p, packed)
    except Exception as exc:  # reported to every rank through the gather, then raised
        error = exc
    device = _device(loc, group)
    host_rows = device.type == "cpu"
    if error is not None and not strict and not host_rows:
        raise error  # no host read of the rows on the device: the others cannot be told
    row = torch.zeros(_WIDTH, dtype=torch.float64, device=device)
    values = [0.0, float(error is not None), op, float(len(arrays)), dtypes_sig, repl_sig]
    values += [p if ord_code != 0 else math.inf, c, e]
    for i, v in enumerate(values):
        if i != _NORM and v != 0.0:
            row[i].fill_(v)  # a fill kernel, not a host-to-device copy
    if isinstance(norm, torch.Tensor):
        row[_NORM].copy_(norm.to(device).reshape(()))
    else:
        row[_NORM].fill_(norm)
    if error is not None:  # the reason, as bytes (a host-to-device copy on the error path only)
        text = _reason_bytes(error)
        if text:
            raw = torch.frombuffer(bytearray(text), dtype=torch.uint8)
            row.view(torch.uint8)[_REASON * 8 : _REASON * 8 + len(text)].copy_(raw)
    rows = _gather(row, group)
    if strict or host_rows:
        _check_rows(rows.cpu().numpy(), error)
    total = _combine(rows[:, _NORM], ord_code, p)
    return Reduced(total, loc, ord_code, p, group)


def result_array(total: torch.Tensor, loc: _Local, like: list[Any]) -> Any:
    """The global norm as the caller's library returns it: torch (on its device) or NumPy."""
    dtype = torch.float64 if loc.wide else torch.float32
    if like and isinstance(like[0], torch.Tensor):
        return total.to(dtype)
    np_dtype = np.float64 if loc.wide else np.float32
    return np.asarray(float(total), dtype=np_dtype)
