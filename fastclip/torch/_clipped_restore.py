"""What a failed ``ClippedOptimizer.step()`` puts back: copies of the clipper's
attributes and of the gradients taken before the step, and their restore.

Used by ``_clipped.py`` (the step) only.  Importing this module imports torch.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any

import torch

__all__ = ["clipper_restore", "clipper_snapshot", "copy_into", "grads_of", "put_grads"]


def _snap(value: Any) -> Any:
    """A copy of a fastclip clipper's attribute that the clipper's next update cannot reach.

    ``copy.deepcopy`` visits every element: an AutoClip with 50,000 recorded norms
    took 200 ms a copy (measured here, torch 2.13 CPU).  fastclip's clippers keep
    immutable numbers (or tuples of them) in their lists, deques, sets and dicts,
    which the containers' C-level ``copy()`` copies (about 1 ms for 50,000);
    ``tests/integration/test_clipped_optimizer_safety.py`` checks every clipper.
    """
    kind = type(value)
    if kind in (list, set, deque, dict):
        return value.copy()
    if isinstance(value, torch.Tensor):
        return value.clone()
    if kind.__module__.startswith("fastclip.") and hasattr(value, "__dict__"):
        twin = object.__new__(kind)  # a fastclip helper object (AutoClip's percentile)
        twin.__dict__.update({k: _snap(v) for k, v in vars(value).items()})
        return twin
    return copy.deepcopy(value)  # numbers, strings, None: returned as they are


def clipper_snapshot(clipper: Any) -> Any:
    """A copy of ``clipper.__dict__`` (None for a clipper without one)."""
    attrs = getattr(clipper, "__dict__", None)
    if attrs is None:
        return None
    if type(clipper).__module__.startswith("fastclip."):
        return {k: _snap(v) for k, v in attrs.items()}
    return copy.deepcopy(attrs)  # a user's clipper: nothing known of its containers


def clipper_restore(clipper: Any, snapshot: Any) -> None:
    """Put :func:`clipper_snapshot`'s copy back as ``clipper.__dict__``'s content."""
    if snapshot is not None:
        attrs = clipper.__dict__
        attrs.clear()
        attrs.update(snapshot)


def grads_of(params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Fresh copies of the parameters' gradients (None where there is none)."""
    return [None if p.grad is None else p.grad.clone() for p in params]


def put_grads(params: list[torch.Tensor], saved: list[torch.Tensor | None]) -> None:
    """Give each parameter its saved gradient back, into the same tensor object
    where it still has one of that shape."""
    for p, g in zip(params, saved):
        if g is None:
            p.grad = None
        elif p.grad is None or p.grad.shape != g.shape:
            p.grad = g.clone()  # never the kept backup buffer itself
        else:
            p.grad.copy_(g)  # the same tensor object: hooks and bucket views keep it


def copy_into(kept: list[torch.Tensor] | None, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` copied into ``kept``, the buffers of the last step (new ones when
    there are none or their layout changed); returns the buffers written.

    Buffers kept between steps because fresh clones each step cost 1.7x a
    clip_grad_norm_ + AdamW step of 4M float32 values (page faults of new
    memory; benchmarks/bench_clipped_optimizer.py), reused ones ~1.1x.
    """
    if (
        kept is None
        or len(kept) != len(grads)
        or any(
            b.shape != g.shape or b.dtype != g.dtype or b.device != g.device
            for b, g in zip(kept, grads)
        )
    ):
        kept = [torch.empty_like(g) for g in grads]
    torch._foreach_copy_(kept, grads)
    return kept
