"""Lists of arrays as (address, size) tables: ``pack``, ``Table``, ``Packed``.

``pack`` validates a list (dtype, device, writeability, overlaps) and groups it
by storage dtype, one table per dtype, so N arrays cost one kernel launch per
dtype, not N.  Contiguous data is used in place, zero-copy; non-contiguous data
is *copied in* to a contiguous buffer, and ``Packed.copy_out`` writes it back
after an in-place kernel.  Two fast paths skip the per-array Python work: the
bulk NumPy header read (``_headers``) and a C-level ``map`` over torch tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _config as cfg
from .._errors import out_of_place_hint
from .._formulas import robust_norm
from .._libraries import route_of_many
from .._memory import check_no_overlap, check_self_overlap, raise_first_overlap
from ._adapters import NumpyLib, float_storage, lib_for, norm_dtype
from ._headers import headers_ok, read_headers
from ._launch import earned, run, run_serial


class Table:
    """One storage dtype's arrays as parallel (address, size) columns.

    ``index``: the rows' positions in the caller's list, or None when the
    table is the whole list in order (the fast paths: one dtype).
    """

    __slots__ = ("addrs", "index", "like", "n", "sizes")

    def __init__(
        self,
        like: np.ndarray,
        addrs: np.ndarray,
        sizes: np.ndarray,
        n: int | None = None,
        index: np.ndarray | None = None,
    ):
        self.like = like
        self.addrs = addrs
        self.sizes = sizes
        self.n = int(sizes.sum()) if n is None else n
        self.index = index


class Packed:
    """Arrays of one call grouped into tables, plus copies to write back."""

    def __init__(self) -> None:
        self.tables: list[Table] = []
        self.dtype: np.dtype | None = None  # norm dtype (float64 if any group is wide)
        self.copies: list[tuple[np.ndarray, np.ndarray]] = []  # (caller view, contiguous copy)
        self.extents: list[tuple[int, int, Any]] = []  # (start, end, view) for overlap checks

    def norm(self, ord_code: int, p: float, wide: bool = False) -> float:
        """Global norm of all tables, rescaled where power sums over/underflow.

        ``wide``: accumulate every element in float64 (``_wide_kernels``), so the
        result does not depend on how the elements are split among arrays.
        """
        if not wide:
            return robust_norm(self.total_pow_sum, ord_code, p, self.dtype == np.float64)

        def wide_sum(pc: int, pp: float, inv: float) -> float:
            return self.total_pow_sum(pc, pp, inv, "tab_pow_sum_wide")

        # float64 sums of widened squares can over/underflow like float64 data's
        return robust_norm(wide_sum, ord_code, p, True)

    def total_pow_sum(
        self, ord_code: int, p: float, inv: float = 1.0, kernel: str = "tab_pow_sum"
    ) -> float:
        total = 0.0
        for t in self.tables:
            s = float(run(kernel, t.n, t.addrs, t.sizes, t.like, ord_code, p, inv, cfg.CHUNK))
            if ord_code != 0:
                total += s
            elif s != s or total != total:
                total = math.nan
            elif s > total:
                total = s
        return total

    def scale(self, coef: float) -> None:
        for t in self.tables:
            run("tab_scale", t.n, t.addrs, t.addrs, t.sizes, t.like, coef, True, cfg.CHUNK)
        self.copy_out()

    def clamp(self, vmin: float, vmax: float) -> None:
        for t in self.tables:
            run("tab_clamp", t.n, t.addrs, t.addrs, t.sizes, t.like, vmin, vmax, True, cfg.CHUNK)
        self.copy_out()

    def byte_extents(self) -> tuple[np.ndarray, np.ndarray, list[Any]]:
        """(starts, ends, strided views or None) of the caller's non-empty arrays, for
        overlap checks across packs: the slow path recorded them (``writing``); the
        fast paths' tables hold contiguous arrays only."""
        if self.extents:
            starts = np.array([e[0] for e in self.extents], np.int64)
            ends = np.array([e[1] for e in self.extents], np.int64)
            return starts, ends, [e[2] for e in self.extents]
        starts_l, ends_l = [], []
        for t in self.tables:
            live = t.sizes > 0
            starts_l.append(t.addrs[live])
            ends_l.append(t.addrs[live] + t.sizes[live] * t.like.itemsize)
        starts, ends = np.concatenate(starts_l), np.concatenate(ends_l)
        return starts, ends, [None] * starts.size

    def copy_out(self) -> None:
        """Write contiguous working copies back into the caller's strided memory."""
        for view, copy in self.copies:
            view[...] = copy


_LIKE: dict[np.dtype, np.ndarray] = {}


def _like(dtype: np.dtype) -> np.ndarray:
    marker = _LIKE.get(dtype)
    if marker is None:
        marker = _LIKE[dtype] = np.empty(0, dtype)
    return marker


def _torch_storage_dtypes() -> dict[Any, np.dtype]:
    import torch

    return {
        torch.float32: np.dtype(np.float32),
        torch.float64: np.dtype(np.float64),
        torch.bfloat16: np.dtype(np.uint16),
        torch.float16: np.dtype(np.int16),
        torch.complex64: np.dtype(np.complex64),
        torch.complex128: np.dtype(np.complex128),
    }


_TORCH_STORAGE: dict[Any, np.dtype] = {}

#: Up to this many tensors, addresses and sizes are gathered through Python lists:
#: 1.2 against 1.75 us for one tensor, 0.05 against 0.9 us for the total size
#: (``np.fromiter`` and ``ndarray.sum`` have a fixed cost; past ~10 tensors
#: ``fromiter`` is as fast).
_FEW_TENSORS = 8


def pack(lib: Any, arrays: Sequence[Any], what: str, writing: bool) -> Packed:
    """Validate every array (dtype, device, writeability, overlaps) and build the tables.

    Nothing is written here; a bad array anywhere raises before any kernel runs.
    """
    packed = Packed()
    if lib is NumpyLib:
        if _fast_numpy_pack(arrays if type(arrays) is list else list(arrays), packed, writing):
            return packed
        route_of_many(arrays)  # the full library check that the API deferred to us
        rows = [_numpy_row(a, what, writing) for a in arrays]
    else:
        if _fast_torch_pack(arrays, packed, writing):
            return packed
        rows = _torch_rows(arrays, what, writing)
    groups: dict[np.dtype, tuple[list[int], list[int], list[int]]] = {}
    for i, (storage_dtype, addr, size, view, copy) in enumerate(rows):
        if copy is not None:
            packed.copies.append((view, copy))
        if writing and size:
            if copy is None:  # contiguous: its bytes are exactly [addr, addr + nbytes)
                packed.extents.append((addr, addr + size * storage_dtype.itemsize, None))
            else:
                start, end = np.lib.array_utils.byte_bounds(view)
                packed.extents.append((start, end, view))
        g = groups.setdefault(storage_dtype, ([], [], []))
        g[0].append(addr)
        g[1].append(size)
        g[2].append(i)
    for storage_dtype, (addrs, sizes, index) in groups.items():
        table = Table(_like(storage_dtype), np.array(addrs, np.int64), np.array(sizes, np.int64))
        if len(groups) > 1:
            table.index = np.array(index, np.int64)
        packed.tables.append(table)
    packed.dtype = _group_norm_dtype(groups.keys())
    if writing:
        check_no_overlap(packed.extents)
    return packed


def _group_norm_dtype(storages: Any) -> np.dtype:
    dtypes = [norm_dtype(s) for s in storages]
    return np.dtype(np.float64) if np.dtype(np.float64) in dtypes else np.dtype(np.float32)


def _numpy_row(a: Any, what: str, writing: bool) -> tuple[np.dtype, int, int, np.ndarray, Any]:
    sv = float_storage(NumpyLib, a, what)
    if writing and not a.flags.writeable:
        raise ValueError(f"{what}_ got a read-only array; {out_of_place_hint(what)}")
    copy = None
    buf = sv
    if not sv.flags.c_contiguous:
        if writing:
            check_self_overlap(sv.shape, sv.strides, what)
        buf = copy = np.ascontiguousarray(sv)
    return sv.dtype, buf.ctypes.data, buf.size, sv, copy


def _torch_rows(tensors: Sequence[Any], what: str, writing: bool) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]]
    if not _TORCH_STORAGE:
        _TORCH_STORAGE.update(_torch_storage_dtypes())
    storage_of = _TORCH_STORAGE
    rows = []
    for t in tensors:
        storage_dtype = storage_of.get(t.dtype)
        if storage_dtype is None:
            float_storage(lib_for("torch"), t, what)  # raises the TypeError
        if not t.is_cpu:
            raise TypeError(
                f"all tensors in one call must be on one device, got cpu and {t.device}"
            )
        if t.is_contiguous() and not (t.is_conj() or t.is_neg()):
            rows.append((storage_dtype, t.data_ptr(), t.numel(), t, None))
        else:
            sv = lib_for("torch").storage(t)
            if writing:
                check_self_overlap(sv.shape, sv.strides, what)
            copy = np.ascontiguousarray(sv)
            rows.append((storage_dtype, copy.ctypes.data, copy.size, sv, copy))
    return rows


def _fast_torch_pack(tensors: Sequence[Any], packed: Packed, writing: bool) -> bool:
    """One dtype, all contiguous CPU tensors: gather addresses with C-level ``map``.

    A Python loop asking each tensor five questions costs ~0.5 us per tensor;
    ``map`` over the unbound methods costs ~0.1 us.  Anything unusual (mixed
    dtypes, strided or lazily negated tensors, other devices) takes ``_torch_rows``.
    """
    import operator

    import torch

    if not _TORCH_STORAGE:
        _TORCH_STORAGE.update(_torch_storage_dtypes())
    n = len(tensors)
    T = torch.Tensor
    dtypes = set(map(operator.attrgetter("dtype"), tensors))
    if len(dtypes) != 1:
        return False
    dtype = next(iter(dtypes))
    storage_dtype = _TORCH_STORAGE.get(dtype)
    if (
        storage_dtype is None
        or not all(map(operator.attrgetter("is_cpu"), tensors))
        or not all(map(T.is_contiguous, tensors))
        or any(map(T.is_neg, tensors))
        or (dtype.is_complex and any(map(T.is_conj, tensors)))  # conj bit: complex only
    ):
        return False
    if n <= _FEW_TENSORS:  # fromiter and a NumPy sum cost ~1 us each, whatever n
        size_list = list(map(T.numel, tensors))
        addrs = np.array(list(map(T.data_ptr, tensors)), np.int64)
        sizes = np.array(size_list, np.int64)
        total = sum(size_list)
    else:
        addrs = np.fromiter(map(T.data_ptr, tensors), np.int64, n)
        sizes = np.fromiter(map(T.numel, tensors), np.int64, n)
        total = None
    # One contiguous tensor cannot overlap another: the check is for two or more
    if (
        writing
        and n > 1
        and not run_serial("extents_disjoint", addrs, sizes, storage_dtype.itemsize)
    ):
        raise_first_overlap(addrs, sizes, storage_dtype.itemsize)
    packed.tables.append(Table(_like(storage_dtype), addrs, sizes, total))
    packed.dtype = norm_dtype(storage_dtype)
    return True


def _fast_numpy_pack(arrays: list[Any], packed: Packed, writing: bool) -> bool:
    """Read all headers in one kernel call when every array is a plain contiguous one.

    ``a.ctypes.data`` alone costs ~3 us per array; this costs a few ns.  Any
    array that is not an exact, aligned, writeable, C-contiguous ndarray of the
    first array's dtype (float32/float64) sends the call to the slow path.
    """
    if (
        not cfg.FAST_NUMPY_HEADERS
        or len(arrays) < cfg.FAST_HEADERS_MIN_ARRAYS
        or type(arrays) is not list
        or type(arrays[0]) is not np.ndarray
    ):
        return False
    dtype = arrays[0].dtype
    if dtype.kind != "f" or dtype.itemsize < 4 or not dtype.isnative:
        return False
    if not earned("numpy_headers") or not headers_ok():
        return False
    addrs, sizes, _, n_bad, disjoint, total = read_headers(arrays, dtype, writing)
    if n_bad:
        return False
    if not disjoint:  # overlap, or an order too scrambled to check in the kernel
        raise_first_overlap(addrs, sizes, dtype.itemsize)
    packed.tables.append(Table(_like(dtype), addrs, sizes, total))
    packed.dtype = norm_dtype(dtype)
    return True
