"""CPU driver of the fused optimizer kernels: packing and grouping.

Arrays are grouped by dtype (one launch per dtype), each group's lists are
packed into (address, size) tables by the core's ``_pack.pack`` (zero-copy for
contiguous data, copy-in/copy-out otherwise), and the kernels of
``_optim_kernels`` (``tab_adamw``, ``tab_sgd``) run by name through the core's
``_launch.run``: serial or parallel by size, with the same threading rules.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._memory import shared_pair
from ._pack import pack


class Group:
    """One dtype's tensors: ``index`` into the caller's lists and one table per list.

    ``written`` are the packs whose contiguous working copies (of strided
    arrays) go back to the caller after the launch: the lists written in
    place, never the read-only ones or the placeholders.
    """

    __slots__ = ("index", "like", "n", "packs", "sizes", "written")

    def __init__(self, index: list[int], packs: list[Any], written: list[Any]):
        self.index = index
        self.packs = packs
        self.written = written
        first = packs[0].tables[0]
        self.sizes = first.sizes
        self.like = first.like
        self.n = first.n

    def addrs(self, k: int) -> np.ndarray:
        return self.packs[k].tables[0].addrs  # type: ignore[no-any-return]

    def copy_out(self) -> None:
        for packed in self.written:
            packed.copy_out()


_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")


def groups(
    lib: Any, lists: Sequence[Sequence[Any] | None], writing: Sequence[bool], what: str
) -> list[Group]:
    """Validate and pack parallel lists (params first) into per-dtype groups.

    Every list must have the params' length, and element ``i`` of each list
    the shape and dtype of ``params[i]``.  ``None`` lists reuse the params'
    table (placeholders the kernel never touches).  Raises before any write.
    """
    params = lists[0]
    assert params is not None
    n = len(params)
    pdtypes = list(map(_DTYPE, params))
    pshapes = list(map(_SHAPE, params))
    for k, lst in enumerate(lists[1:], 1):
        if lst is None:
            continue
        if len(lst) != n:
            raise ValueError(f"{what}: list {k} has {len(lst)} arrays, the params list has {n}")
        if list(map(_DTYPE, lst)) != pdtypes:
            raise TypeError(f"{what}: every array must have the dtype of its parameter")
        if list(map(_SHAPE, lst)) != pshapes:
            raise ValueError(f"{what}: every array must have the shape of its parameter")
    kinds = set(pdtypes)
    if len(kinds) == 1:
        index_sets = [list(range(n))]
    else:
        by: dict[Any, list[int]] = {}
        for i, d in enumerate(pdtypes):
            by.setdefault(d, []).append(i)
        index_sets = list(by.values())
    out = []
    for index in index_sets:
        packs: list[Any] = []
        written = []
        for lst, w in zip(lists, writing):
            if lst is None:  # a placeholder: the params' table, not a second copy of them
                packs.append(packs[0])
                continue
            sub = list(lst) if len(index) == n else [lst[i] for i in index]
            packs.append(pack(lib, sub, what, writing=w))
            if w:
                written.append(packs[-1])
        if packs[0].tables[0].like.dtype.kind == "c":
            raise TypeError(f"{what}: complex parameters are not supported")
        out.append(Group(index, packs, written))
    _check_written_disjoint([p for g in out for p in g.written], what)
    return out


def _check_written_disjoint(packs: list[Any], what: str) -> None:
    """ValueError when two arrays that one step writes (parameters, state) share memory.

    Each list was checked on its own by ``pack``; this checks across lists (a
    moment buffer passed as a parameter too would be updated twice).
    """
    if len(packs) < 2:
        return
    extents = [packed.byte_extents() for packed in packs]
    starts = np.concatenate([e[0] for e in extents])
    ends = np.concatenate([e[1] for e in extents])
    views = [v for e in extents for v in e[2]]
    if shared_pair(starts, ends, views) is not None:
        raise ValueError(
            f"{what}: two of the arrays written in place (parameters, state) share "
            "memory; pass each piece of memory once"
        )


def global_norm_and_dtype(lib: Any, grads: list[Any], ord_code: int, p: float) -> tuple[float, Any]:
    """The core's global norm of the gradients as a float (``robust_norm``:
    rescaled where the float64 power sum over/underflows) and its dtype."""
    packed = pack(lib, grads, "norm", writing=False)
    return packed.norm(ord_code, p), packed.dtype
