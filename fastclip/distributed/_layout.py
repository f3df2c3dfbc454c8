"""What each rank counts, in any parallel layout: DTensor placements on any mesh,
caller-given layouts of plain arrays, tie groups, and the same memory passed twice.

Every array gets a set of *replicated* groups (a DTensor's ``Replicate`` mesh
dims, a :class:`Layout`'s ``replicated_over``, its tie groups, ``replicated=``)
and is counted on a rank only where that rank is the first (local rank 0) of
each of them; everything else is a disjoint part of the global set, summed over
the reduction group.  Each mesh or group an array lives on is also a *domain*:
every rank of it lists the domain, with a checksum of what it holds there, in
the one gathered row, so that ranks disagreeing on meshes, layouts or tie groups
are found on every rank (see ``_reduce._check_domains``).
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Layout", "Local", "account", "dtensor_class", "dtensor_local", "group_ranks"]


def dtensor_class() -> Any:
    """torch's DTensor class, or None when its module was never imported (no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def dtensor_local(a: Any) -> tuple[Any, bool]:
    """A DTensor's local tensor and whether this rank counts it: not when a
    ``Replicate`` placement puts the same values on a lower rank of that mesh
    dimension.  A ``Partial`` placement is refused (NotImplementedError)."""
    counts = True
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
    return a.to_local(), counts


def group_ranks(group: Any) -> tuple[int, ...]:
    """The global ranks of a process group (None: the world), in group-rank order."""
    return tuple(int(r) for r in dist.get_process_group_ranks(group or dist.group.WORLD))


def _as_group(g: Any, what: str) -> Any:
    """A ProcessGroup from a ProcessGroup or a 1-D DeviceMesh."""
    if hasattr(g, "get_group") and hasattr(g, "ndim"):
        if g.ndim != 1:
            raise ValueError(
                f"fastclip.distributed.Layout: {what} takes process groups or 1-D meshes, "
                f"got a {g.ndim}-D mesh; pass mesh[name] for each dimension"
            )
        return g.get_group()
    if not isinstance(g, dist.ProcessGroup):
        raise TypeError(
            f"fastclip.distributed.Layout: {what} takes process groups (or 1-D device "
            f"meshes), got {type(g).__name__}"
        )
    return g


class Layout:
    """How a plain array (or a DTensor outside its mesh) is laid out over process groups.

    Parameters
    ----------
    replicated_over : sequence of ProcessGroup or 1-D DeviceMesh
        Groups whose ranks all hold the same values of the array (data
        parallel replicas; a weight every tensor-parallel rank keeps whole,
        such as a LayerNorm's).  Counted on the first rank of each only.
    sharded_over : sequence of ProcessGroup or 1-D DeviceMesh
        Groups whose ranks hold disjoint parts (tensor-parallel shards).  The
        parts are summed, as is everything not replicated; naming the group
        makes every rank of it check that its ranks pass the same number of
        such arrays with the same dtypes.

    An array given an empty ``Layout()`` is this rank's own (a pipeline
    stage's parameter): summed over the reduction group, checked against no
    other rank.

    Examples
    --------
    >>> import fastclip.distributed as fcd
    >>> fcd.Layout()
    Layout(replicated_over=0 groups, sharded_over=0 groups)
    """

    def __init__(self, replicated_over: Sequence[Any] = (), sharded_over: Sequence[Any] = ()):
        self.replicated_over = tuple(_as_group(g, "replicated_over") for g in replicated_over)
        self.sharded_over = tuple(_as_group(g, "sharded_over") for g in sharded_over)

    def __repr__(self) -> str:
        return (
            f"Layout(replicated_over={len(self.replicated_over)} groups, "
            f"sharded_over={len(self.sharded_over)} groups)"
        )


class Local:
    """One rank's view of a call: the local arrays, what it counts, its domains."""

    def __init__(self) -> None:
        self.arrays: list[Any] = []  # local arrays (DTensors unwrapped): what gets scaled
        self.counted: list[Any] = []  # what enters this rank's share of the norm
        self.wide = False  # any float64/complex128 array: the result is float64
        self.base: list[str] = []  # dtypes of the arrays sharded over the reduction group
        # domain key -> [size, description, parts]: what this rank holds on each mesh/group
        self.domains: dict[float, list[Any]] = {}
        self.duplicates = 0  # arrays not counted again: the same memory passed twice


def _key(text: str) -> float:
    return float(zlib.crc32(text.encode()) + 1)  # 0 marks an empty slot of the row


def _add(loc: Local, kind: str, ranks: tuple[int, ...], desc: str, part: str) -> None:
    entry = loc.domains.setdefault(_key(f"{kind}:{ranks}"), [len(ranks), desc, []])
    entry[2].append(part)


def _memory_key(a: Any) -> tuple[Any, ...] | None:
    """What identifies an array's values: its memory and layout (None: unknown)."""
    if isinstance(a, torch.Tensor):
        if a.layout is not torch.strided or a.numel() == 0:
            return None
        return ("t", str(a.device), a.data_ptr(), tuple(a.shape), a.stride(), str(a.dtype))
    if isinstance(a, np.ndarray):
        if a.size == 0:
            return None
        ptr = a.__array_interface__["data"][0]
        return ("n", ptr, a.shape, a.strides, str(a.dtype))
    return None


def _per_array(value: Any, arrays: list[Any], what: str) -> list[Any]:
    """``value`` given for all arrays, as a list, a dict (arrays or indices as keys), or one item."""
    n = len(arrays)
    if value is None:
        return [None] * n
    if isinstance(value, Layout):
        return [value] * n
    out: list[Any] = [None] * n
    pairs = list(value.items()) if isinstance(value, dict) else None
    if pairs is None:
        items = list(value)
        if len(items) != n:
            raise ValueError(
                f"fastclip.distributed: {what} has {len(items)} entries for {n} arrays; pass "
                "one per array (None for the default), a dict, or one Layout for all"
            )
        return items
    for k, v in pairs:
        for i in _positions(k, arrays, what):
            out[i] = v
    return out


def _positions(item: Any, arrays: list[Any], what: str) -> list[int]:
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        i = int(item)
        if not -len(arrays) <= i < len(arrays):
            raise IndexError(f"{what} index {i} out of range for {len(arrays)} arrays")
        return [i % len(arrays)]
    matches = [k for k, a in enumerate(arrays) if a is item]
    if not matches:
        raise ValueError(
            f"fastclip.distributed: every array in `{what}` must also be one of "
            "`local_arrays` (the same object), or an index into them"
        )
    return matches


def _ties(tied: Any, arrays: list[Any]) -> dict[int, list[Any]]:
    """Array position -> its tie groups, from ``(array or index, group)`` pairs or a dict."""
    out: dict[int, list[Any]] = {}
    if not tied:
        return out
    pairs = list(tied.items()) if isinstance(tied, dict) else list(tied)
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(
                "fastclip.distributed: tied takes (array or index, process group) pairs, "
                f"got {pair!r}"
            )
        group = _as_group(pair[1], "tied")
        for i in _positions(pair[0], arrays, "tied"):
            out.setdefault(i, []).append(group)
    return out


def _mesh_text(mesh: Any) -> str:
    return f"{mesh.mesh.tolist()}:{mesh.mesh_dim_names}"


def account(
    arrays: list[Any],
    replicated: Sequence[Any],
    layout: Any,
    tied: Any,
    g_ranks: tuple[int, ...],
    explicit_group: bool,
) -> tuple[Local, list[int]]:
    """What this rank counts and the domains it lists; the positions of ``replicated``."""
    me = dist.get_rank()
    g_rank = g_ranks.index(me)
    dtensor = dtensor_class()
    repl_idx: set[int] = set()
    for item in replicated:
        repl_idx.update(_positions(item, arrays, "replicated"))
    layouts = _per_array(layout, arrays, "layout")
    ties = _ties(tied, arrays)
    members = set(g_ranks)
    loc = Local()
    counted_memory: set[tuple[Any, ...]] = set()
    for k, a in enumerate(arrays):
        lay, counts = layouts[k], True
        if lay is not None and not isinstance(lay, Layout):
            raise TypeError(
                f"fastclip.distributed: layout entries must be Layout or None, got "
                f"{type(lay).__name__} for array {k}"
            )
        groups: list[tuple[str, Any]] = []  # (kind, group) of the layout and the ties
        if lay is not None:
            groups += [("R", g) for g in lay.replicated_over]
            groups += [("S", g) for g in lay.sharded_over]
        groups += [("T", g) for g in ties.get(k, [])]
        if dtensor is not None and isinstance(a, dtensor):
            mesh = a.device_mesh
            mranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
            if lay is None and set(mranks) != members:
                how = "is part of the group you passed" if explicit_group else "does not span"
                raise ValueError(
                    f"fastclip.distributed: DTensor {k} lives on a mesh of ranks "
                    f"{sorted(mranks)}, which {how} the reduction group's ranks "
                    f"{sorted(members)}: say how the other ranks relate to it with "
                    "layout=fastclip.distributed.Layout(replicated_over=[...]) (they hold "
                    "copies: FSDP-only parameters under FSDP2 + TP, over the TP group) or "
                    "Layout() (they hold other parts: pipeline stages), or pass the group "
                    "of exactly its mesh"
                )
            if not set(mranks) <= members:
                raise ValueError(
                    f"fastclip.distributed: DTensor {k}'s mesh has ranks {sorted(mranks)} "
                    f"outside the reduction group's {sorted(members)}; pass a group covering them"
                )
            local, counts = dtensor_local(a)
            part = f"{a.dtype}:{tuple(a.shape)}:{a.placements}"
            _add(loc, "M:" + _mesh_text(mesh), mranks, f"the mesh {_mesh_text(mesh)}", part)
            a = local
        elif lay is None and k not in ties:
            loc.base.append(str(a.dtype))
        if k in repl_idx and g_rank != 0:
            counts = False
        for kind, g in groups:
            ranks = group_ranks(g)
            if not set(ranks) <= members:
                raise ValueError(
                    f"fastclip.distributed: array {k}'s {'tie' if kind == 'T' else 'layout'} "
                    f"group has ranks {sorted(ranks)} outside the reduction group's "
                    f"{sorted(members)}; pass group= covering every group of the layout"
                )
            if kind != "S" and ranks.index(me) != 0:
                counts = False  # a lower rank of this group holds the same values
            shape = "" if kind == "S" else f":{tuple(a.shape)}"
            name = {"R": "replicated", "S": "sharded", "T": "tied"}[kind]
            _add(loc, kind, ranks, f"the {name} group of ranks {list(ranks)}", f"{a.dtype}{shape}")
        memory = _memory_key(a)
        if counts and memory is not None:
            if memory in counted_memory:
                counts = False  # tied weights passed twice: the same values, counted once
                loc.duplicates += 1
            counted_memory.add(memory)
        loc.arrays.append(a)
        if counts:
            loc.counted.append(a)
    loc.wide = any(str(a.dtype).rsplit(".", 1)[-1] in ("float64", "complex128") for a in loc.arrays)
    return loc, sorted(repl_idx)
