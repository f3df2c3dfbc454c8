"""What :mod:`fastclip.distributed` reduces: the one all_gather, its checks, the combination.

:func:`reduce_norms` has ``_layout.account`` decide what this rank counts,
checks the arrays (before the gather, for in-place calls), computes the local
norm in float64, gathers one float64 row per rank (norm, error flag,
signature, refusal reason, the meshes and groups this rank holds arrays on),
checks the rows identically on every rank and combines the ranks' norms
without over- or underflow.  The package docstring explains the row and why
it is one gather.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fastclip import _dispatch
from fastclip._validate import check_eps, check_max_norm, check_ord

from . import _devices
from ._layout import Local, account, dtensor_class, dtensor_local, group_ranks
from ._local import by_device, combine, local_norm

__all__ = [
    "OP_CLIP",
    "OP_NORM",
    "Reduced",
    "dtensor_class",
    "dtensor_local",
    "reduce_norms",
    "result_array",
]

# Columns of the gathered row.
_NORM, _ERROR, _OP, _COUNT, _DTYPES, _REPL, _ORD, _MAX_NORM, _EPS = range(9)
_REASON = 9  # first column of the refusing rank's error text
_REASON_BYTES = 160  # 20 float64 columns: enough for the error's type and its first sentence
_DOMAINS = _REASON + _REASON_BYTES // 8  # (key, size, checksum) of each mesh / group held
_SLOTS = 16  # meshes and groups one rank may hold arrays on in one call
_WIDTH = _DOMAINS + 3 * _SLOTS
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


def _check_targets(arrays: list[Any]) -> list[Any]:
    """Every check the in-place clip makes before its first write, made now.

    Run before the gather so that a refusal travels in it (see "Refusals are
    collective" in the :mod:`fastclip.distributed` docstring), once per
    library and device (CPU-offloaded gradients beside device ones).
    """
    return [
        _dispatch.backend_for(part).check_targets(part, "clip_by_global_norm")
        for part in by_device(arrays)
    ]


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
    raw = np.ascontiguousarray(row[_REASON:_DOMAINS]).view(np.uint8).tobytes()
    text = raw.rstrip(b"\0").decode("utf-8", "replace")
    cut = len(raw.rstrip(b"\0")) == _REASON_BYTES
    return text + ("..." if cut else "")


def _check_domains(rows: np.ndarray, loc: Local, g_ranks: tuple[int, ...]) -> None:
    """Every rank of each mesh / group listed it, with the same checksum (the same
    decision on every rank: it reads only the gathered rows)."""
    listed: dict[float, list[tuple[int, float, float]]] = {}
    for r in range(rows.shape[0]):
        for s in range(_SLOTS):
            key, size, check = rows[r, _DOMAINS + 3 * s : _DOMAINS + 3 * s + 3]
            if key != 0:
                listed.setdefault(float(key), []).append((r, float(size), float(check)))
    for key in sorted(listed):
        entries = listed[key]
        sizes = {e[1] for e in entries}
        checks = {e[2] for e in entries}
        if len(entries) == int(max(sizes)) and len(sizes) == 1 and len(checks) == 1:
            continue
        ranks = [g_ranks[e[0]] for e in entries]
        mine = loc.domains.get(key)
        what = mine[1] if mine is not None else f"a mesh or group of {int(max(sizes))} ranks"
        raise ValueError(
            f"fastclip.distributed: the ranks disagree on {what}: ranks {ranks} hold arrays "
            f"on it (of its {int(max(sizes))} ranks), with checksums "
            f"{[int(e[2]) for e in entries]} of their (dtype, shape, placements); every rank "
            "of a mesh or of a layout / tie group must pass the same arrays on it (same "
            "count, dtypes, meshes, tie groups); nothing was modified"
        )


def _check_rows(
    rows: np.ndarray, own_error: BaseException | None, loc: Local, g_ranks: tuple[int, ...]
) -> None:
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
            hint = (
                " (arrays that differ between ranks, such as pipeline stages' parameters, "
                "need layout=fastclip.distributed.Layout(...))"
                if col in (_COUNT, _DTYPES)
                else ""
            )
            raise ValueError(
                f"fastclip.distributed: the ranks of the group disagree on {what}: "
                f"{values.tolist()} by rank; every rank must pass the same number of arrays, "
                f"with the same dtypes, and the same arguments{hint}; nothing was modified"
            )
    _check_domains(rows, loc, g_ranks)


class Reduced:
    """The global norm of one call and this rank's view of it."""

    def __init__(self, total: torch.Tensor, loc: Local, ord_code: int, p: float, group: Any):
        self.total = total  # float64 0-d, on the row's device
        self.loc = loc
        self.ord_code = ord_code
        self.p = p
        self.group = group


def _crc(text: str) -> float:
    return float(zlib.crc32(text.encode()))


def reduce_norms(
    local_arrays: Any,
    ord: Any,
    group: Any,
    replicated: Any,
    op: float,
    max_norm: Any,
    eps: Any,
    strict: bool,
    layout: Any = None,
    tied: Any = None,
    precheck: Callable[[], None] | None = None,
) -> Reduced:
    """The one collective of a call; ``precheck`` (the caller's own validation, such as
    a fused optimizer's) runs first and its error is sent like any refusal."""
    arrays = _dispatch.as_array_list(local_arrays)
    explicit = group is not None
    if group is None and layout is None and not tied:
        group = _resolve_group(None, arrays)
    g_ranks = group_ranks(group)
    error: BaseException | None = None
    loc = Local()
    ord_code, p = 2, 2.0
    c = e = 0.0
    norm: Any = 0.0
    dtypes_sig = repl_sig = 0.0
    try:
        if precheck is not None:
            precheck()
        ord_code, p = check_ord(ord)
        if op == OP_CLIP:
            c, e = check_max_norm(max_norm), check_eps(eps)
        repl = list(replicated) if isinstance(replicated, (list, tuple, set)) else [replicated]
        loc, repl_positions = account(arrays, repl, layout, tied, g_ranks, explicit)
        if len(loc.domains) > _SLOTS:
            raise ValueError(
                f"fastclip.distributed: this rank's arrays live on {len(loc.domains)} meshes "
                f"and groups; one call takes at most {_SLOTS}"
            )
        pattern = ";".join(f"{k}:{tuple(loc.arrays[k].shape)}" for k in repl_positions)
        dtypes_sig, repl_sig = _crc(",".join(loc.base)), _crc(pattern)
        packed = _check_targets(loc.arrays) if op == OP_CLIP else [None]
        if len(packed) != 1 or len(loc.counted) != len(loc.arrays):
            packed = [None]  # not all counted here (or several devices): pack the counted ones
        norm = local_norm(loc.counted, ord_code, p, packed[0])
    except Exception as exc:  # reported to every rank through the gather, then raised
        error = exc
    device = _devices.choose(loc.arrays or arrays, group)
    host_rows = device.type == "cpu"
    if error is not None and not strict and not host_rows:
        raise error  # no host read of the rows on the device: the others cannot be told
    row = torch.zeros(_WIDTH, dtype=torch.float64, device=device)
    values = [0.0, float(error is not None), op, float(len(loc.base)), dtypes_sig, repl_sig]
    values += [p if ord_code != 0 else math.inf, c, e]
    for slot, (key, (size, _, parts)) in enumerate(sorted(loc.domains.items())[:_SLOTS]):
        at = _DOMAINS + 3 * slot
        values += [0.0] * (at + 3 - len(values))
        values[at : at + 3] = [key, float(size), _crc("|".join(parts))]
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
            raw = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)
            row.view(torch.uint8)[_REASON * 8 : _REASON * 8 + len(text)].copy_(raw)
    rows = _gather(row, group)
    if strict or host_rows:
        _check_rows(rows.cpu().numpy(), error, loc, g_ranks)
    total = combine(rows[:, _NORM], ord_code, p)
    return Reduced(total, loc, ord_code, p, group)


def result_array(total: torch.Tensor, loc: Local, like: list[Any]) -> Any:
    """The global norm as the caller's library returns it: torch (on the arrays' device) or
    NumPy."""
    dtype = torch.float64 if loc.wide else torch.float32
    if like and isinstance(like[0], torch.Tensor):
        return total.to(device=like[0].device, dtype=dtype)
    np_dtype = np.float64 if loc.wide else np.float32
    return np.asarray(float(total), dtype=np_dtype)
