"""Which arrays share memory: byte-extent sweeps and the stride-0 check.

Pure NumPy, used by the CPU and GPU routes alike (a device pointer is an
integer as good as a host one).  A leaf: imports only ``_errors``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ._errors import out_of_place_hint, raise_overlap

__all__ = [
    "check_disjoint",
    "check_no_overlap",
    "check_self_overlap",
    "overlapping_extents",
    "raise_first_overlap",
    "shared_pair",
]


def check_self_overlap(shape: Any, strides: Any, what: str) -> None:
    """ValueError for an in-place target whose elements share memory.

    A stride of 0 over an axis longer than 1 (``expand``, ``broadcast_to``,
    ``as_strided``) makes several elements one memory location: writing them
    in place is ambiguous, and torch's own in-place ops refuse it.  Only
    non-contiguous arrays can be such views, so callers check those only.
    """
    if any(n > 1 and s == 0 for n, s in zip(shape, strides)):
        raise ValueError(
            f"{what}_ got an array whose elements share memory (stride 0, as from expand "
            f"or broadcast_to), which cannot be written in place; {out_of_place_hint(what)}"
        )


def overlapping_extents(starts: np.ndarray, ends: np.ndarray) -> Iterator[tuple[int, int]]:
    """Yield index pairs whose [start, end) ranges intersect (sweep after a vectorised test)."""
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    if s.size < 2 or not np.any(np.maximum.accumulate(e)[:-1] > s[1:]):
        return
    active: list[int] = []
    for pos in range(s.size):
        active = [q for q in active if e[q] > s[pos]]
        for q in active:
            i, j = sorted((int(order[q]), int(order[pos])))
            yield i, j
        active.append(pos)


def shared_pair(starts: np.ndarray, ends: np.ndarray, views: Sequence[Any]) -> Any:
    """The first (i, j) whose byte ranges [start, end) overlap and really share
    memory (exactly, with ``np.shares_memory``, when both are strided views),
    or None."""
    for i, j in overlapping_extents(starts, ends):
        vi, vj = views[i], views[j]
        if vi is None or vj is None or np.shares_memory(vi, vj):
            return i, j
    return None


def check_no_overlap(extents: list[tuple[int, int, Any]]) -> None:
    """ValueError when two arrays of an in-place call share memory (scaled twice).

    ``extents`` are (first byte, end byte, strided view or None); extents that
    overlap are checked exactly with ``np.shares_memory`` when both are strided
    views (``a[::2]`` and ``a[1::2]`` interleave without sharing an element).
    """
    if len(extents) < 2:
        return
    starts = np.fromiter((e[0] for e in extents), np.int64, len(extents))
    ends = np.fromiter((e[1] for e in extents), np.int64, len(extents))
    pair = shared_pair(starts, ends, [e[2] for e in extents])
    if pair is not None:
        raise_overlap(*pair)


def raise_first_overlap(addrs: np.ndarray, sizes: np.ndarray, itemsize: int) -> None:
    """ValueError naming two contiguous rows that share bytes; returns if none do."""
    nonempty = sizes > 0
    index = np.nonzero(nonempty)[0]
    ends = addrs + sizes * itemsize
    for i, j in overlapping_extents(addrs[nonempty], ends[nonempty]):
        raise_overlap(int(index[i]), int(index[j]))


def check_disjoint(views: list[np.ndarray]) -> None:
    """ValueError when two NumPy views of an in-place list share memory."""
    if len(views) < 2:
        return
    bounds = [np.lib.array_utils.byte_bounds(v) if v.size else (0, 0) for v in views]
    starts = np.array([b[0] for b in bounds], np.int64)
    ends = np.array([b[1] for b in bounds], np.int64)
    pair = shared_pair(starts, ends, views)
    if pair is not None:
        raise ValueError(
            f"arrays {pair[0]} and {pair[1]} of this in-place call share memory. Pass each "
            "piece of memory once."
        )
