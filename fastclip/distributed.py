r"""Global norms and global-norm clipping of gradients sharded over ``torch.distributed`` ranks.

Each rank holds some shards (and perhaps some replicated arrays) of one
global set of gradients.  :func:`global_norm` gives every rank the norm of
the *full* set, as if all shards were concatenated on one process;
:func:`clip_by_global_norm_` then scales every rank's shards by the same
coefficient.  Torch ``DTensor`` gradients (FSDP2 ``fully_shard``, tensor
parallel) are unwrapped with ``to_local()`` and counted through their
placements.

.. math::

    \|g\|_p = \Big(\sum_{r=0}^{W-1} \|g^{(r)}\|_p^p\Big)^{1/p}, \qquad
    \|g\|_\infty = \max_r \|g^{(r)}\|_\infty

where :math:`g^{(r)}` is what rank :math:`r` *counts*: its shards, plus the
replicated arrays on rank 0 of the group only.

How the ranks agree, in one collective
--------------------------------------
Each rank computes the norm of what it counts with fastclip's kernels, in
float64 and over/underflow-safe (on the CPU: the driver's packed tables,
one parallel kernel per dtype, the float64 value kept rather than rounded
to float32).  Then **one** ``all_gather`` of a small float64 row per rank
(the local norm, an error flag, and a signature of the call: number of
arrays, a hash of their dtypes, of the replicated set, ``ord``,
``max_norm``, ``eps``).  Every rank then combines the ``W`` local norms
identically:

.. math:: M = \max_r n_r, \qquad
          \|g\|_p = M \Big(\sum_r (n_r / M)^p\Big)^{1/p}

This is the same number a SUM all-reduce of power sums gives, but

* it never over- or underflows (a SUM of :math:`n_r^p` overflows float64 for
  float64 gradients near 1e154 and ``p = 2``, or for large ``p``);
* no pow/root round trip on rounded values: local norms stay float64;
* NaN travels as data, so it is never lost (gloo's ``MAX`` all-reduce drops
  NaN: a NaN on one rank came back finite); any NaN gives NaN on every rank,
  any inf (without NaN) gives inf;
* the signature lets every rank detect bad input (different numbers of
  arrays, dtypes, ``ord``...) or a failure on another rank, and raise the
  same error on every rank instead of hanging in a later collective.

The row is ``W x 29`` float64 values (232 bytes per rank): the 9 values above
and, when a rank refused its input, the first 160 bytes of its error
(``"ValueError: ..."``, UTF-8), so that the other ranks can say why.

Refusals are collective
-----------------------
:func:`clip_by_global_norm_` (and :func:`clip_grad_norm_`) run every check
that the in-place clip makes before its first write (dtypes, one library and
device, read-only arrays, expanded arrays whose elements share memory, arrays
that overlap each other) on each rank *before* the gather.  A rank whose
input fails them sends a refused flag and its reason in the same row; then
every rank raises and none writes anything: the refusing rank its own error,
the others a ``ValueError`` naming the refusing rank(s) and the reason.  No
extra collective is made.  Were the checks left to the clip after the
gather, the refusing rank would raise while the others scaled their shards:
replicas of one model would silently diverge.

On GPUs the local norm stays on the device and the gather runs on it; the
result is a device tensor.  With ``strict=True`` (the default) the gathered
rows (``W x 232`` bytes) are read on the host once to check the signatures:
pass ``strict=False`` for no host synchronisation at all beyond the
collective (then bad input on some rank may hang or give wrong results,
as with a plain all-reduce: a rank that refuses its input raises before
the gather, so the others wait in it until the group's timeout, having
modified nothing).  Rows that are on the host already (CPU tensors, NumPy
arrays) are always checked, ``strict`` or not: that costs nothing.
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

from . import _api, _dispatch
from ._validate import NonFiniteNormError, check_eps, check_max_norm, check_ord

__all__ = [
    "clip_by_global_norm_",
    "clip_grad_norm_",
    "get_total_norm",
    "global_norm",
    "has_dtensor",
    "local_tensors",
]

# Columns of the gathered row.
_NORM, _ERROR, _OP, _COUNT, _DTYPES, _REPL, _ORD, _MAX_NORM, _EPS = range(9)
_REASON = 9  # first column of the refusing rank's error text
_REASON_BYTES = 160  # 20 float64 columns: enough for the error's type and its first sentence
_WIDTH = _REASON + _REASON_BYTES // 8
_OP_NORM, _OP_CLIP = 1.0, 2.0
_SIGNATURE_NAMES = {
    _OP: "the function called (global_norm / clip_by_global_norm_)",
    _COUNT: "the number of arrays",
    _DTYPES: "the dtypes of the arrays",
    _REPL: "the replicated arrays (positions and shapes)",
    _ORD: "ord",
    _MAX_NORM: "max_norm",
    _EPS: "eps",
}


def has_dtensor(tensors: Sequence[Any]) -> bool:
    """True if any element is a ``torch.distributed.tensor.DTensor``.

    Costs one dictionary lookup when no DTensor was ever created (the DTensor
    module is not imported), for ``fastclip.torch`` to call on every step.
    """
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return False
    cls = getattr(module, "DTensor", None)
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local_tensors(tensors: Sequence[Any]) -> list[Any]:
    """The tensors with every DTensor replaced by its local shard (``to_local()``, no copy).

    For scaling DTensor gradients in place by an already reduced norm
    (``fastclip.torch.clip_grads_with_norm_``): scaling is elementwise, so
    scaling the local shards scales the DTensors.
    """
    dtensor = _dtensor_class()
    if dtensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def _dtensor_class() -> Any:
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


class _Local:
    """One rank's view of a call: the local arrays and what it counts."""

    def __init__(self) -> None:
        self.arrays: list[Any] = []  # local arrays (DTensors unwrapped): what gets scaled
        self.counted: list[Any] = []  # what enters this rank's share of the norm
        self.meshes: list[Any] = []  # the device meshes of DTensor inputs
        self.wide = False  # any float64/complex128 array: the result is float64


def _unwrap(arrays: list[Any], replicated: Sequence[Any], rank_in_group: int) -> _Local:
    dtensor = _dtensor_class()
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
            loc.meshes.append(mesh)
            a = a.to_local()
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
    collective" above).  Returns the CPU driver's packed tables (to reuse for
    the norm) or None.
    """
    if not arrays:
        return None
    return _dispatch.backend_for(arrays).check_targets(arrays, "clip_by_global_norm")


def _local_norm(counted: list[Any], pcode: int, p: float, packed: Any = None) -> Any:
    """This rank's norm as a float (CPU) or a float64 0-d device tensor (GPU).

    ``packed``: the CPU tables of exactly ``counted``, already built and checked.
    """
    if not counted:
        return 0.0
    # The CPU route's float64 norm: over/underflow-safe, not rounded to the dtype.
    exact = _dispatch.backend_for(counted).norm64(counted, pcode, p, packed)
    if exact is not None:
        return float(exact)
    value = _api.global_norm(counted, math.inf if pcode == 0 else p)
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
    dtensor = _dtensor_class()
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


def _combine(norms: torch.Tensor, pcode: int, p: float) -> torch.Tensor:
    """The global norm from the ranks' norms, on their device (NaN and inf propagate)."""
    m = norms.amax()  # torch's amax propagates NaN
    if pcode == 0:
        return m
    ok = torch.isfinite(m) & (m > 0)
    scale = torch.where(ok, m, torch.ones_like(m))
    s = torch.sum(torch.pow(norms / scale, p))
    total = scale * (torch.sqrt(s) if pcode == 2 else s if pcode == 1 else torch.pow(s, 1.0 / p))
    return torch.where(ok, total, m)  # 0, inf or NaN: the max says it all


class _Reduced:
    def __init__(self, total: torch.Tensor, loc: _Local, pcode: int, p: float, group: Any):
        self.total = total  # float64 0-d, on the arrays' device
        self.loc = loc
        self.pcode = pcode
        self.p = p
        self.group = group


def _reduce(
    local_arrays: Any,
    ord: Any,
    group: Any,
    replicated: Any,
    op: float,
    max_norm: Any,
    eps: Any,
    strict: bool,
) -> _Reduced:
    arrays = _dispatch.as_array_list(local_arrays)
    group = _resolve_group(group, arrays)
    rank = dist.get_rank(group)
    error: BaseException | None = None
    loc = _Local()
    pcode, p = 2, 2.0
    c = e = 0.0
    norm: Any = 0.0
    dtypes_sig = repl_sig = 0.0
    try:
        pcode, p = check_ord(ord)
        if op == _OP_CLIP:
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
        packed = _check_targets(loc.arrays) if op == _OP_CLIP else None
        if packed is not None and len(loc.counted) != len(loc.arrays):
            packed = None  # replicated arrays not counted here: pack the counted ones
        norm = _local_norm(loc.counted, pcode, p, packed)
    except Exception as exc:  # reported to every rank through the gather, then raised
        error = exc
    device = _device(loc, group)
    host_rows = device.type == "cpu"
    if error is not None and not strict and not host_rows:
        raise error  # no host read of the rows on the device: the others cannot be told
    row = torch.zeros(_WIDTH, dtype=torch.float64, device=device)
    values = [0.0, float(error is not None), op, float(len(arrays)), dtypes_sig, repl_sig]
    values += [p if pcode != 0 else math.inf, c, e]
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
    total = _combine(rows[:, _NORM], pcode, p)
    return _Reduced(total, loc, pcode, p, group)


def _output(total: torch.Tensor, loc: _Local, like: list[Any]) -> Any:
    dtype = torch.float64 if loc.wide else torch.float32
    if like and isinstance(like[0], torch.Tensor):
        return total.to(dtype)
    np_dtype = np.float64 if loc.wide else np.float32
    return np.asarray(float(total), dtype=np_dtype)


def global_norm(
    local_arrays: Any,
    ord: float = 2,
    *,
    group: Any = None,
    replicated: Any = (),
    strict: bool = True,
) -> Any:
    r"""p-norm of a set of arrays sharded over the ranks of a process group.

    .. math:: \|g\|_p = \Big(\sum_{r} \sum_{x \in C_r} \sum_i |x_i|^p\Big)^{1/p}

    where :math:`C_r` is what rank :math:`r` counts: all of its local arrays,
    except replicated ones (counted on rank 0 of the group only) and DTensor
    shards that a Replicate placement copies onto other ranks.

    Call it on every rank of ``group`` (a collective).

    Parameters
    ----------
    local_arrays : array or iterable of arrays
        This rank's arrays: torch tensors (CPU or CUDA), ``DTensor``\ s, or
        NumPy arrays (gloo groups).  Empty shards are fine.  Every rank must
        pass the same number of arrays with the same dtypes (shapes may
        differ: uneven shards).
    ord : float, default 2
        Any real ``p > 0`` or ``inf``.
    group : ProcessGroup, optional
        The group to reduce over; default: the mesh's group for DTensors on
        one 1-D mesh, else the default (world) group.
    replicated : sequence of arrays or ints
        Arrays of ``local_arrays`` (the same objects, or their positions)
        that every rank holds in full, counted once (on rank 0 of the group).
    strict : bool, default True
        Check on every rank that all ranks passed consistent input and that
        none failed, raising the same error everywhere (one tiny host read of
        the gathered rows on GPUs).  ``False``: no host synchronisation.

    Returns
    -------
    array
        The 0-d global norm, identical on every rank: a torch tensor on the
        arrays' device (a NumPy array for NumPy input), float64 if any array
        is float64 or complex128, else float32.  NaN on any rank gives NaN
        everywhere; inf (and no NaN) gives inf.

    Raises
    ------
    ValueError
        On every rank, when ranks pass different numbers of arrays, dtypes,
        ``ord``, replicated sets, or when another rank's input was rejected
        (that rank raises its own TypeError/ValueError).
    NotImplementedError
        A DTensor with a ``Partial`` placement.

    Examples
    --------
    One process, a group of one (with several ranks each passes its shards):

    >>> import datetime, socket, numpy as np, torch.distributed as dist
    >>> import fastclip.distributed as fcd
    >>> with socket.socket() as s:
    ...     _ = s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
    ...                         world_size=1, timeout=datetime.timedelta(seconds=30))
    >>> shards = [np.array([3.0], np.float32), np.array([], np.float32)]
    >>> bias = np.array([4.0], np.float32)
    >>> fcd.global_norm(shards + [bias], replicated=[bias])
    array(5., dtype=float32)
    >>> dist.destroy_process_group()
    """
    red = _reduce(local_arrays, ord, group, replicated, _OP_NORM, None, None, strict)
    return _output(red.total, red.loc, red.loc.arrays)


def clip_by_global_norm_(
    local_arrays: Any,
    max_norm: float,
    ord: float = 2,
    *,
    group: Any = None,
    replicated: Any = (),
    eps: float = 1e-6,
    error_if_nonfinite: bool = False,
    strict: bool = True,
) -> Any:
    r"""Clip arrays sharded over ranks by their global norm, in place; returns that norm.

    .. math:: x \leftarrow x \cdot \min\Big(1, \frac{c}{\|g\|_p + \varepsilon}\Big)

    with :math:`\|g\|_p` from :func:`global_norm`: the same coefficient on
    every rank, applied to every local array (replicated ones included),
    by fastclip's ``clip_by_global_norm_`` with ``total_norm`` given, so
    results equal the single-process clip of the full arrays.

    Parameters
    ----------
    local_arrays, ord, group, replicated, strict
        As in :func:`global_norm`.
    max_norm : float
        ``c >= 0``.
    eps : float, default 1e-6
        Added to the norm in the denominator (torch's value).
    error_if_nonfinite : bool, default False
        Raise :class:`fastclip.NonFiniteNormError` on every rank, with
        nothing modified, when the global norm is NaN or inf.

    Returns
    -------
    array
        The global norm before clipping (see :func:`global_norm`).

    Raises
    ------
    ValueError, TypeError
        On every rank, with nothing written on any rank, when some rank's
        arrays cannot be clipped in place (read-only, expanded so that
        elements share memory, overlapping each other, unsupported dtype) or
        the ranks' calls disagree: the refusing rank raises its own error,
        the others a ``ValueError`` naming it and its reason.  The checks
        run before the one collective and their outcome travels in it.
    NonFiniteNormError
        With ``error_if_nonfinite=True``, on every rank, nothing written.

    Examples
    --------
    >>> import datetime, socket, torch, torch.distributed as dist
    >>> import fastclip.distributed as fcd
    >>> with socket.socket() as s:
    ...     _ = s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
    ...                         world_size=1, timeout=datetime.timedelta(seconds=30))
    >>> g = [torch.tensor([3.0]), torch.tensor([4.0])]
    >>> fcd.clip_by_global_norm_(g, 1.0, eps=0.0)
    tensor(5.)
    >>> g
    [tensor([0.6000]), tensor([0.8000])]
    >>> dist.destroy_process_group()
    """
    red = _reduce(local_arrays, ord, group, replicated, _OP_CLIP, max_norm, eps, strict)
    loc = red.loc
    if error_if_nonfinite and not bool(torch.isfinite(red.total)):
        raise NonFiniteNormError(
            f"the global norm over the ranks is non-finite ({float(red.total)}), so nothing was "
            "clipped on any rank; pass error_if_nonfinite=False to scale by it anyway"
        )
    out = _output(red.total, loc, loc.arrays)
    if not loc.arrays:
        return out
    on_gpu = _dispatch.backend_for(loc.arrays).on_gpu
    given: Any = red.total if on_gpu else float(red.total)
    with torch.no_grad():
        _api.clip_by_global_norm_(
            loc.arrays, max_norm, math.inf if red.pcode == 0 else red.p, eps=eps, total_norm=given
        )
    return out


# ------------------------------------------------ fastclip.torch integration


def _as_dtensor_like(total: torch.Tensor, tensors: list[Any]) -> Any:
    """A Replicate DTensor on the mesh of the DTensors, as torch returns; else ``total``."""
    dtensor = _dtensor_class()
    meshes = {id(t.device_mesh): t.device_mesh for t in tensors if isinstance(t, dtensor)}
    if len(meshes) != 1:
        return total
    from torch.distributed.tensor import Replicate

    mesh = next(iter(meshes.values()))
    return dtensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


def get_total_norm(
    tensors: list[Any], norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> Any:
    """``fastclip.torch.get_total_norm`` for gradients that include DTensors.

    Returns a Replicate DTensor holding the full norm (as torch does: call
    ``.full_tensor()`` for a plain tensor) when the DTensors share one mesh.
    """
    total = global_norm(tensors, norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise NonFiniteNormError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    return _as_dtensor_like(total, tensors)


def clip_grad_norm_(
    grads: list[Any], max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> Any:
    """``fastclip.torch.clip_grad_norm_`` for gradients that include DTensors.

    ``grads`` are the non-None gradients.  The norm is reduced over the
    DTensors' mesh (see :func:`clip_by_global_norm_`); returns it as a
    Replicate DTensor on that mesh, like ``torch.nn.utils.clip_grad_norm_``.
    """
    try:
        total = clip_by_global_norm_(
            grads, max_norm, norm_type, eps=1e-6, error_if_nonfinite=error_if_nonfinite
        )
    except NonFiniteNormError:
        raise NonFiniteNormError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        ) from None
    return _as_dtensor_like(total, grads)
