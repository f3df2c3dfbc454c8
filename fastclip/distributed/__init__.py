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
