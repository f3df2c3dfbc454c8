"""Host chunk tables for N parallel lists, the device-table cache, and the
validated, dtype-grouped arrays of one call (:class:`Packed`) with their
norm, scale and clamp launches.

A group of tensors of one dtype becomes one int64 device table
``[ptrs of every list | sizes | chunk_tensor | chunk_start]`` (one H2D copy,
cached while the addresses stay the same).  The table maths is pure NumPy, no
CuPy: unit-tested on every machine against plain-Python expectations
(``tests/gpu/test_gpu_plan.py``).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _config as cfg
from .._errors import raise_overlap
from .._memory import check_self_overlap, overlapping_extents
from . import _modules
from ._modules import ELEMENT_TYPES

__all__ = [
    "ITEMSIZE",
    "TABLES",
    "Group",
    "Packed",
    "chunk_table",
    "device_table",
    "elementwise_grid",
    "grid_size",
    "pack_table",
    "ptr",
    "ptr_or_null",
    "u64",
]

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


# ------------------------------------------------------------ host planning


def chunk_table(sizes: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(tensor index, first element) of every chunk of every tensor, in order.

    A tensor of n elements has ceil(n / chunk) chunks; empty tensors have none.
    """
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    sizes = np.asarray(sizes, np.int64)
    counts = (sizes + chunk - 1) // chunk
    tensor = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
    first = np.cumsum(counts) - counts  # index of each tensor's first chunk
    start = (np.arange(tensor.size, dtype=np.int64) - np.repeat(first, counts)) * chunk
    return tensor, start


def grid_size(work_items: int, max_blocks: int) -> int:
    """Blocks for a grid-stride launch over ``work_items`` (at least 1)."""
    return int(max(1, min(work_items, max_blocks)))


def elementwise_grid(n: int, block: int, max_blocks: int) -> int:
    """Blocks for a grid-stride elementwise launch over n elements."""
    return grid_size((n + block - 1) // block, max_blocks)


def pack_table(ptrs: list[int], sizes: list[int], chunk: int) -> tuple[np.ndarray, int, int]:
    """One int64 buffer [ptrs | sizes | chunk_tensor | chunk_start] (one H2D copy).

    ``ptrs`` holds the pointers of every list, list after list (``len(sizes)``
    each).  Returns (buffer, number of tensors, number of chunks).  Pointers are
    stored as int64 bit patterns of the unsigned addresses.
    """
    n = len(sizes)
    n_ptrs = len(ptrs)
    size_arr = np.asarray(sizes, np.int64)
    tensor, start = chunk_table(size_arr, chunk)
    buf = np.empty(n_ptrs + n + 2 * tensor.size, np.int64)
    buf[:n_ptrs] = np.asarray(ptrs, np.uint64).view(np.int64)
    buf[n_ptrs : n_ptrs + n] = size_arr
    buf[n_ptrs + n : n_ptrs + n + tensor.size] = tensor
    buf[n_ptrs + n + tensor.size :] = start
    return buf, n, int(tensor.size)


def u64(address: int) -> np.uint64:
    return np.uint64(address)


def ptr(arr: Any, lib: Any) -> np.uint64:
    return u64(lib.ptr(arr))


def ptr_or_null(lib: Any, arr: Any) -> np.uint64:
    return u64(0) if arr is None else u64(lib.ptr(arr))


# ------------------------------------------------------------ device tables

TABLES: collections.OrderedDict[tuple[Any, ...], tuple[Any, Any]] = collections.OrderedDict()


def device_table(lib: Any, like: Any, buf: np.ndarray) -> Any:
    """The table on the device, uploaded once per (device, stream, content) and cached.

    Gradients usually keep their addresses from step to step, so the common case
    uploads nothing; a cached table also makes CUDA-graph capture copy-free.
    """
    key = (lib.name, lib.device_id(like), lib.stream_id(like), buf.tobytes())
    hit = TABLES.get(key)
    if hit is not None:
        TABLES.move_to_end(key)
        return hit[0]
    dev, pinned = lib.upload(buf, like)
    TABLES[key] = (dev, pinned)  # the pinned source stays alive as long as the copy
    while len(TABLES) > cfg.GPU_TABLE_CACHE:
        TABLES.popitem(last=False)
    return dev


class Group:
    """Tensors of one dtype as a device table: the pointers of every list, sizes,
    chunk table; ``index``: their positions in the lists (the fused steps)."""

    def __init__(
        self,
        lib: Any,
        kind: str,
        ptrs: list[list[int]],
        sizes: list[int],
        like: Any,
        index: list[int] | None = None,
    ):
        n_lists = len(ptrs)
        flat = [q for lst in ptrs for q in lst]
        buf, self.n, self.n_chunks = pack_table(flat, sizes, cfg.GPU_CHUNK)
        self.kind = kind
        self.index = index
        self.numel = int(sum(sizes))
        self.table = device_table(lib, like, buf)
        base = lib.ptr(self.table)
        n, nc = self.n, self.n_chunks
        self.ptrs = u64(base)
        self.sizes = u64(base + 8 * n_lists * n)
        self.chunk_tensor = u64(base + 8 * (n_lists + 1) * n)
        self.chunk_start = u64(base + 8 * (n_lists + 1) * n + 8 * nc)


class Packed:
    """Validated arrays of one call, grouped by dtype, with copies to write back."""

    def __init__(self, lib: Any, arrays: Sequence[Any], what: str, writing: bool):
        self.lib = lib
        self.like = arrays[0]
        self.device = lib.device_id(arrays[0])
        self.copies: list[tuple[Any, Any]] = []
        by_kind: dict[str, tuple[list[int], list[int], list[int]]] = {}
        extents = []
        for i, a in enumerate(arrays):
            kind = lib.kind(a)
            if kind is None:
                raise TypeError(
                    f"{what} on the GPU needs float16, bfloat16, float32 or float64 arrays, "
                    f"got {a.dtype}"
                )
            if lib.device_id(a) != self.device:
                raise TypeError(
                    "all arrays in one GPU call must be on one device, got devices "
                    f"{self.device} and {lib.device_id(a)}"
                )
            buf = a
            if not lib.contiguous(a):
                if writing:
                    check_self_overlap(tuple(a.shape), lib.strides(a), what)
                buf = lib.as_contiguous(a)
                self.copies.append((a, buf))
            elif writing and lib.numel(a):
                extents.append((lib.ptr(a), lib.ptr(a) + lib.numel(a) * ITEMSIZE[kind]))
            ptrs, sizes, index = by_kind.setdefault(kind, ([], [], []))
            ptrs.append(lib.ptr(buf))
            sizes.append(lib.numel(buf))
            index.append(i)
        if writing and len(extents) > 1:
            starts = np.array([e[0] for e in extents], np.uint64).view(np.int64)
            ends = np.array([e[1] for e in extents], np.uint64).view(np.int64)
            for i, j in overlapping_extents(starts, ends):
                raise_overlap(i, j)
        self._keepalive = [c for _, c in self.copies]
        self.n_arrays = len(arrays)
        # ``index``: the rows' positions in the caller's list (None: the whole list, in order)
        self.groups = [
            Group(lib, k, [p], s, self.like, None if len(by_kind) == 1 else i)
            for k, (p, s, i) in by_kind.items()
        ]
        self.norm_kind = "float64" if "float64" in by_kind else "float32"
        self.partials: Any = None

    def _launch(self, name: str, g: Group, head: tuple[Any, ...], tail: tuple[Any, ...]) -> None:
        """One launch of a table kernel: ``name(*head, sizes, chunk table, *tail)``."""
        k = _modules.kernel("core", self.device, name, ELEMENT_TYPES[g.kind])
        grid = grid_size(g.n_chunks, cfg.GPU_MAX_BLOCKS)
        table = (g.sizes, g.chunk_tensor, g.chunk_start, np.int64(g.n_chunks))
        k((grid,), (cfg.GPU_BLOCK,), (*head, *table, np.int64(cfg.GPU_CHUNK), *tail))

    def launch_partials(self, partials: Any, ord_code: int, p: float) -> int:
        """One partial-sum launch per dtype; returns the number of partials written."""
        offset = 0
        base = self.lib.ptr(partials)
        for g in self.groups:
            if g.n_chunks:
                tail = (np.int32(ord_code), np.float64(p), u64(base + 8 * offset))
                self._launch("fastclip_partial_pow_sum", g, (g.ptrs,), tail)
            offset += g.n_chunks
        return offset

    def launch_scale(self, dst: Packed | None, coef: Any) -> None:
        """dst = (src * coef[0]) * coef[1] (in place without ``dst``): ``coef`` is
        the float64 device pair of ``finish`` in modes 3 and 4, or (factor, 1)."""
        for i, g in enumerate(self.groups):
            if g.n_chunks:
                d = g if dst is None else dst.groups[i]
                self._launch("fastclip_scale", g, (g.ptrs, d.ptrs), (ptr(coef, self.lib),))
        if dst is None:  # in place: contiguous working copies go back to the caller
            self.copy_out()

    def launch_clamp(self, lo: float, hi: float) -> None:
        for g in self.groups:
            if g.n_chunks:
                tail = (np.float64(lo), np.float64(hi))
                self._launch("fastclip_clamp", g, (g.ptrs, g.ptrs), tail)
        self.copy_out()

    def copy_out(self) -> None:
        for view, copy in self.copies:
            self.lib.write_back(view, copy)

    def finish(
        self,
        ord_code: int,
        p: float,
        max_norm: float,
        eps: float,
        mode: int,
        given: Any = None,
        per_array: bool = False,
    ) -> tuple[Any, ...]:
        """Partials -> (0-d norm, float64 coefficient), all on the device: one factor
        (0-d) for modes 1 (clip) and 2 (normalise), the two factors (c, c2) of
        ``coefficient_parts`` (shape (2,), as ``launch_scale`` reads them) for
        modes 3 (clip) and 4 (normalise); with
        ``per_array`` also the 1-D norms of the arrays (in the caller's order, the
        norm dtype), combined from the same partials: one more small launch per dtype."""
        lib = self.lib
        n_chunks = sum(g.n_chunks for g in self.groups)
        partials = lib.empty((max(1, n_chunks),), "float64", self.like)
        self.launch_partials(partials, ord_code, p)
        self.partials = partials  # kept for per_array_norms (the non-finite diagnosis)
        if per_array:
            per = self.launch_tensor_norms(partials, ord_code, p)
            return (*self._finish(partials, n_chunks, ord_code, p, max_norm, eps, mode, given), per)
        return self._finish(partials, n_chunks, ord_code, p, max_norm, eps, mode, given)

    def per_array_norms(self, ord_code: int, p: float) -> Any:
        """The arrays' norms from the partials of the last ``finish``."""
        return self.launch_tensor_norms(self.partials, ord_code, p)

    def launch_tensor_norms(self, partials: Any, ord_code: int, p: float) -> Any:
        """The arrays' norms from the partials (``fastclip_tensor_norms``, one thread
        per tensor): a new 1-D device array of the norm dtype."""
        lib = self.lib
        per = lib.empty((self.n_arrays,), self.norm_kind, self.like)
        k = _modules.kernel(
            "core", self.device, "fastclip_tensor_norms", ELEMENT_TYPES[self.norm_kind]
        )
        offset = 0
        base = lib.ptr(partials)
        for g in self.groups:
            pos = u64(0)
            if g.index is not None:
                pos = ptr(device_table(lib, self.like, np.asarray(g.index, np.int64)), lib)
            grid = elementwise_grid(g.n, cfg.GPU_BLOCK, cfg.GPU_MAX_BLOCKS)
            args = (
                u64(base + 8 * offset),
                g.chunk_tensor,
                np.int64(g.n_chunks),
                np.int64(g.n),
                pos,
                np.int32(ord_code),
                np.float64(p),
                ptr(per, lib),
            )
            k((grid,), (cfg.GPU_BLOCK,), args)
            offset += g.n_chunks
        return per

    def _finish(
        self,
        partials: Any,
        n_chunks: int,
        ord_code: int,
        p: float,
        max_norm: float,
        eps: float,
        mode: int,
        given: Any,
    ) -> tuple[Any, Any]:
        lib = self.lib
        norm = lib.empty((), self.norm_kind, self.like)
        coef = lib.empty((2,) if mode >= 3 else (), "float64", self.like)
        k = _modules.kernel("core", self.device, "fastclip_finish", ELEMENT_TYPES[self.norm_kind])
        args = (
            ptr(partials, lib),
            np.int64(n_chunks),
            np.int32(ord_code),
            np.float64(p),
            np.float64(max_norm),
            np.float64(eps),
            np.int32(mode),
            u64(0) if given is None else ptr(given, lib),
            ptr(norm, lib),
            ptr(coef, lib),
        )
        k((1,), (cfg.GPU_FINISH_BLOCK,), args)
        return norm, coef
