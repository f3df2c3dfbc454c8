r"""Global norms and global-norm clipping of gradients sharded over ``torch.distributed`` ranks.

Each rank holds some shards (and perhaps some replicated arrays) of one
global set of gradients.  :func:`global_norm` gives every rank the norm of
the *full* set, as if all shards were concatenated on one process;
:func:`clip_by_global_norm_` then scales every rank's shards by the same
coefficient.  Torch ``DTensor`` gradients (FSDP2 ``fully_shard``, tensor
parallel, expert parallel), on one mesh or several, are unwrapped with
``to_local()`` and counted through their placements; plain tensors of other
layouts (pipeline stages, Megatron-style tensor parallelism) through a
:class:`Layout`, tied weights through ``tied=``.  The docs' "Distributed
training" pages give the exact call for FSDP2, FSDP2 + TP, MoE with expert
parallelism and pipeline parallelism.

.. math::

    \|g\|_p = \Big(\sum_{r=0}^{W-1} \|g^{(r)}\|_p^p\Big)^{1/p}, \qquad
    \|g\|_\infty = \max_r \|g^{(r)}\|_\infty

where :math:`g^{(r)}` is what rank :math:`r` *counts*: its shards, and each
replicated array (``Replicate`` placements, ``replicated=``, a layout's
``replicated_over``, a tie group) on the first rank of its group only; the
same memory passed twice on one rank counts once.

How the ranks agree, in one collective
--------------------------------------
Each rank computes the norm of what it counts in float64, every element of
a float32 or 16-bit array widened to float64 before it is summed (so the
norm does not depend on how the model is split; float64 arrays take
fastclip's float64 kernels), over/underflow-safe.  Then **one**
``all_gather`` over the reduction group, whatever the number of meshes and
groups, of a small float64 row per rank (the local norm, an error flag, a
signature of the call: number of arrays sharded over the group, a hash of
their dtypes, of the replicated set, ``ord``, ``max_norm``, ``eps``; and a
key, size and checksum of each mesh or group this rank holds arrays on, so
that ranks of one mesh or group that disagree are found on every rank).  Every rank then combines the ``W`` local norms
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

The row is ``W x 77`` float64 values (616 bytes per rank): the 9 values above,
when a rank refused its input the first 160 bytes of its error
(``"ValueError: ..."``, UTF-8), so that the other ranks can say why, and 16
slots of (key, size, checksum) for the meshes and groups (at most 16 per
call and rank).

Devices
-------
The row lives where the group's backend takes tensors: CPU gradients on a
group that serves the CPU (gloo) keep it on the CPU; CPU gradients on an
NCCL-only group (FSDP2 CPU offload) go through the current CUDA device; CUDA
gradients keep it on theirs (``_devices.row_device``; the NCCL path has not
run on a GPU).

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
rows (``W x 616`` bytes) are read on the host once to check the signatures:
pass ``strict=False`` for no host synchronisation at all beyond the
collective (then bad input on some rank may hang or give wrong results,
as with a plain all-reduce: a rank that refuses its input raises before
the gather, so the others wait in it until the group's timeout, having
modified nothing).  Rows that are on the host already (CPU tensors, NumPy
arrays) are always checked, ``strict`` or not: that costs nothing.
"""

from __future__ import annotations

from ._adaptive import Plan, clip_with_
from ._layout import Layout
from ._norms import clip_by_global_norm_, global_norm, has_dtensor, local_tensors
from ._torch import clip_grad_norm_, get_total_norm

__all__ = [
    "Layout",
    "Plan",
    "clip_by_global_norm_",
    "clip_grad_norm_",
    "clip_with_",
    "get_total_norm",
    "global_norm",
    "has_dtensor",
    "local_tensors",
]

for _obj in (
    Layout,
    Plan,
    clip_by_global_norm_,
    clip_grad_norm_,
    clip_with_,
    get_total_norm,
    global_norm,
    has_dtensor,
    local_tensors,
):
    _obj.__module__ = "fastclip.distributed"  # the public path, whichever file defines it
del _obj
