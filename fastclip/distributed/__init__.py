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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fastclip import _api, _dispatch
from fastclip._errors import NonFiniteNormError, nonfinite_detail, torch_nonfinite_message

from ._reduce import OP_CLIP, OP_NORM, dtensor_class, reduce_norms, result_array

__all__ = [
    "clip_by_global_norm_",
    "clip_grad_norm_",
    "get_total_norm",
    "global_norm",
    "has_dtensor",
    "local_tensors",
]


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
    dtensor = dtensor_class()
    if dtensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


@_dispatch.public("fastclip.distributed.global_norm", "local_arrays")
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
    red = reduce_norms(local_arrays, ord, group, replicated, OP_NORM, None, None, strict)
    return result_array(red.total, red.loc, red.loc.arrays)


@_dispatch.public("fastclip.distributed.clip_by_global_norm_", "local_arrays")
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
    red = reduce_norms(local_arrays, ord, group, replicated, OP_CLIP, max_norm, eps, strict)
    loc = red.loc
    if error_if_nonfinite and not bool(torch.isfinite(red.total)):
        indices = _local_nonfinite(loc.arrays, math.inf if red.ord_code == 0 else red.p)
        where = nonfinite_detail(indices, noun="local array") or (
            " (every norm on this rank is finite: another rank's is not)"
        )
        raise NonFiniteNormError(
            f"the global norm over the ranks is non-finite ({float(red.total)}), so nothing was "
            f"clipped on any rank{where}; pass error_if_nonfinite=False to scale by it anyway",
            indices,
        )
    out = result_array(red.total, loc, loc.arrays)
    if not loc.arrays:
        return out
    on_gpu = _dispatch.backend_for(loc.arrays).on_gpu
    given: Any = red.total if on_gpu else float(red.total)
    with torch.no_grad():
        _api.clip_by_global_norm_(
            loc.arrays,
            max_norm,
            math.inf if red.ord_code == 0 else red.p,
            eps=eps,
            total_norm=given,
        )
    return out


def _local_nonfinite(arrays: list[Any], ord: float) -> list[int]:
    """Positions of this rank's arrays whose own norm is not finite (a second pass
    over the local arrays, made only when raising)."""
    if not arrays:
        return []
    per = _api.global_norm(arrays, ord, per_array=True)[1]
    values = np.asarray(per.cpu()) if isinstance(per, torch.Tensor) else np.asarray(per)
    return np.flatnonzero(~np.isfinite(values)).tolist()


# ------------------------------------------------ fastclip.torch integration


def _as_dtensor_like(total: torch.Tensor, tensors: list[Any]) -> Any:
    """A Replicate DTensor on the mesh of the DTensors, as torch returns; else ``total``."""
    dtensor = dtensor_class()
    meshes = {id(t.device_mesh): t.device_mesh for t in tensors if isinstance(t, dtensor)}
    if len(meshes) != 1:
        return total
    from torch.distributed.tensor import Replicate

    mesh = next(iter(meshes.values()))
    return dtensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


@_dispatch.public("fastclip.distributed.get_total_norm")
def get_total_norm(
    tensors: list[Any], norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> Any:
    """``fastclip.torch.get_total_norm`` for gradients that include DTensors.

    Returns a Replicate DTensor holding the full norm (as torch does: call
    ``.full_tensor()`` for a plain tensor) when the DTensors share one mesh.
    """

    total = global_norm(tensors, norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        dtensor = dtensor_class()
        local = [
            t.to_local() if dtensor is not None and isinstance(t, dtensor) else t for t in tensors
        ]
        indices = _local_nonfinite(local, norm_type)
        raise NonFiniteNormError(torch_nonfinite_message(norm_type, indices), indices)
    return _as_dtensor_like(total, tensors)


@_dispatch.public("fastclip.distributed.clip_grad_norm_", "grads")
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
    except NonFiniteNormError as err:  # torch's message, this rank's culprits kept
        raise NonFiniteNormError(
            torch_nonfinite_message(norm_type, err.indices), err.indices
        ) from None
    return _as_dtensor_like(total, grads)


for _function in (
    clip_by_global_norm_,
    clip_grad_norm_,
    get_total_norm,
    global_norm,
    has_dtensor,
    local_tensors,
):
    _function.__module__ = "fastclip.distributed"  # the public path, whichever file defines it
del _function
