"""``BackwardNorm.register_ddp``'s DDP communication hook.

DDP's default hook averages each gradient bucket (divide by the group size,
``all_reduce``); this one does the same, then measures the bucket's
all-reduced gradients for the ``BackwardNorm`` passed as the hook's state.
"""

from __future__ import annotations

from typing import Any

import torch

from ._grad_measures import _norm_of


def ddp_allreduce_then_measure(state: Any, bucket: Any) -> Any:
    """DDP comm hook: DDP's default averaging all-reduce, then the bucket's
    gradients measured (one launch) and queued for ``_commit_pending``."""
    import torch.distributed as dist

    group = state._ddp_group
    buffer = bucket.buffer()
    buffer.div_(group.size())
    params = bucket.parameters()
    views = bucket.gradients()
    if not state._queued:  # the first bucket of this backward
        state._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(state._after_ddp)
    fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()

    def measure(done: Any) -> torch.Tensor:
        out = done.value()[0]
        if state._active:
            with torch.no_grad():
                for p, v in zip(params, views):
                    k = state._ddp_index.get(id(p))
                    if k is not None:
                        state._pending[k] = (
                            _norm_of([v], state.ord_code, state.p, state.norm_type)
                            if v.numel()
                            else 0.0
                        )
        return out

    return fut.then(measure)


# DDP checks a comm hook's annotations (``bucket: dist.GradBucket``, returns
# ``Future[Tensor]``) and this module's are strings (postponed evaluation): no
# annotations pass that check.
ddp_allreduce_then_measure.__annotations__ = {}
