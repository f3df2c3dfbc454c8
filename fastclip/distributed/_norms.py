"""The public norm and clip of arrays sharded over ranks (see the package docstring)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fastclip import _api, _dispatch
from fastclip._errors import NonFiniteNormError, nonfinite_detail

from ._layout import Layout
from ._reduce import OP_CLIP, OP_NORM, by_device, dtensor_class, reduce_norms, result_array

__all__ = [
    "Layout",
    "clip_by_global_norm_",
    "finish_clip_",
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
    layout: Any = None,
    tied: Any = None,
    strict: bool = True,
) -> Any:
    r"""p-norm of a set of arrays sharded over the ranks of a process group.

    .. math:: \|g\|_p = \Big(\sum_{r} \sum_{x \in C_r} \sum_i |x_i|^p\Big)^{1/p}

    where :math:`C_r` is what rank :math:`r` counts: all of its local arrays,
    except copies: arrays replicated over some group (``replicated=``, a
    :class:`Layout`'s ``replicated_over``, a tie group, a DTensor's
    ``Replicate`` placement on any mesh dimension) count on the first rank of
    that group only, and the same memory passed twice on one rank (tied
    weights) counts once.  DTensors may live on several meshes (dense and
    expert parameters); one ``all_gather`` over ``group`` serves them all.

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
        The group to reduce over: every rank holding a part of the global
        set.  Default: the mesh's group for DTensors on one 1-D mesh (and no
        ``layout`` or ``tied``), else the default (world) group.
    replicated : sequence of arrays or ints
        Arrays of ``local_arrays`` (the same objects, or their positions)
        that every rank holds in full, counted once (on rank 0 of the group).
    layout : Layout, or a sequence / dict of them, optional
        How plain arrays (and DTensors whose mesh is only part of ``group``)
        are laid out: one :class:`Layout` for all, one per array (``None``
        for the default), or ``{array or index: Layout}``.  Default: plain
        arrays are disjoint shards over ``group`` (every rank passes the same
        number with the same dtypes).
    tied : sequence of (array or index, ProcessGroup) pairs, optional
        Arrays that hold the same values on every rank of the group
        (embedding and output weights tied across pipeline stages, after
        their gradients were all-reduced): counted on its first rank only.
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
        ``ord``, replicated sets, meshes, layouts or tie groups, or when
        another rank's input was rejected (that rank raises its own
        TypeError/ValueError).
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
    red = reduce_norms(
        local_arrays, ord, group, replicated, OP_NORM, None, None, strict, layout, tied
    )
    return result_array(red.total, red.loc, red.loc.arrays)


@_dispatch.public("fastclip.distributed.clip_by_global_norm_", "local_arrays")
def clip_by_global_norm_(
    local_arrays: Any,
    max_norm: float,
    ord: float = 2,
    *,
    group: Any = None,
    replicated: Any = (),
    layout: Any = None,
    tied: Any = None,
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
    local_arrays, ord, group, replicated, layout, tied, strict
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
    red = reduce_norms(
        local_arrays, ord, group, replicated, OP_CLIP, max_norm, eps, strict, layout, tied
    )
    return finish_clip_(red, max_norm, eps, error_if_nonfinite)


def finish_clip_(red: Any, max_norm: float, eps: float, error_if_nonfinite: bool) -> Any:
    """The clip after the one collective (``red``, every rank's checks passed): raise on a
    non-finite norm, else scale this rank's arrays; returns the global norm."""
    loc = red.loc
    if error_if_nonfinite and not bool(torch.isfinite(red.total)):
        indices = local_nonfinite(loc.arrays, math.inf if red.ord_code == 0 else red.p)
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
    scale_by_norm_(loc.arrays, red.total, max_norm, red.ord_code, red.p, eps)
    return out


def scale_by_norm_(
    arrays: list[Any], total: Any, max_norm: float, ord_code: int, p: float, eps: float
) -> None:
    """Clip this rank's (checked) local arrays by the reduced norm, one call per device."""
    for part in by_device(arrays):
        on_gpu = _dispatch.backend_for(part).on_gpu
        given: Any = total.to(part[0].device) if on_gpu else float(total)
        with torch.no_grad():
            _api.clip_by_global_norm_(
                part, max_norm, math.inf if ord_code == 0 else p, eps=eps, total_norm=given
            )


def local_nonfinite(arrays: list[Any], ord: float) -> list[int]:
    """Positions of this rank's arrays whose own norm is not finite (a second pass
    over the local arrays, made only when raising)."""
    bad: list[int] = []
    for part in by_device(arrays):
        per = _api.global_norm(part, ord, per_array=True)[1]
        values = np.asarray(per.cpu()) if isinstance(per, torch.Tensor) else np.asarray(per)
        ids = {id(a) for i, a in enumerate(part) if not np.isfinite(values[i])}
        bad += [k for k, a in enumerate(arrays) if id(a) in ids]
    return sorted(set(bad))
