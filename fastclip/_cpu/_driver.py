"""CPU route: validates memory, packs arrays into storage views or address tables,
runs the Numba kernels, and wraps results in the caller's array type.

Layout rules (documented in README, "Routes"):

* C-contiguous data is used in place, zero-copy.
* Non-contiguous data is *copied in* to a contiguous buffer for the kernel; an
  in-place call then *copies out* into the caller's memory, so in-place stays in
  place.  Reductions over leading or trailing axes of contiguous data need no copy.
* Lists of arrays become one table of (address, size) per storage dtype, so N
  arrays cost one kernel launch per dtype, not N.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _config as cfg
from .._dispatch import route_of_many
from .._errors import NonFiniteNormError, nonfinite_message, out_of_place_hint
from .._formulas import (
    SAFE_HI,
    SAFE_LO,
    clip_coefficients,
    int_bound,
    needs_rescale,
    pow2_inverse,
    robust_norm,
    root,
)
from .._memory import check_no_overlap, check_self_overlap, raise_first_overlap
from . import _build
from ._libs import NumpyLib, float_storage, lib_for, norm_dtype

# ------------------------------------------------------------ running kernels


class _ThreadState:
    """What we know about numba's threading layer (see ``run``)."""

    layer: str | None = None  # known after the first parallel launch
    serial_only = False  # set in a child forked after OpenMP started
    lock = threading.Lock()


_state = _ThreadState()


def _after_fork_in_child() -> None:
    # GNU OpenMP kills a forked child that starts a parallel region when the
    # parent already had one (FIELD-NOTES).  Serial kernels are safe there.
    if _state.layer == "omp":
        _state.serial_only = True
    _state.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_SERIAL: dict[str, Any] = {}  # name -> serial dispatcher (a dict lookup is the hot path)


def run(name: str, n: int, *args: Any) -> Any:
    """Run kernel ``name`` on ``n`` elements, serial below the threshold.

    The ``workqueue`` layer aborts the process when two Python threads enter
    parallel regions at once (numbagg's ``_is_in_unsafe_thread_pool`` has the
    story), so until the layer is known, and always under ``workqueue``, a
    parallel launch holds a lock; a thread that cannot take it runs the serial
    kernel instead of waiting.  ``omp`` and ``tbb`` are thread-safe.
    """
    if n < cfg.PARALLEL_MIN_ELEMENTS or _state.serial_only:
        return run_serial(name, *args)
    return _run_parallel(functools.partial(_build.kernel, name), args)


def run_serial(name: str, *args: Any) -> Any:
    """Run kernel ``name`` serially, whatever the threshold (bookkeeping kernels)."""
    serial = _SERIAL.get(name)
    if serial is None:
        serial = _SERIAL[name] = _build.kernel(name, False)
    return serial(*args)


def run_with(kernel_for: Callable[[bool], Any], n: int, *args: Any) -> Any:
    """``run`` for kernels of other modules: ``kernel_for(parallel)`` gives the
    serial or the parallel dispatcher; same threshold, fork and lock rules."""
    if n < cfg.PARALLEL_MIN_ELEMENTS or _state.serial_only:
        return kernel_for(False)(*args)
    return _run_parallel(kernel_for, args)


def _run_parallel(kernel_for: Callable[[bool], Any], args: tuple[Any, ...]) -> Any:
    layer = _state.layer
    if layer is not None and layer != "workqueue":
        return kernel_for(True)(*args)
    lock = _state.lock
    if not lock.acquire(blocking=False):
        return kernel_for(False)(*args)
    try:
        result = kernel_for(True)(*args)
        if layer is None:
            import numba

            _state.layer = numba.threading_layer()
        return result
    finally:
        lock.release()


def threading_layer() -> str | None:
    return _state.layer


# ------------------------------------------------------------- single arrays


def _as_2d(sv: np.ndarray, shape: tuple[int, int]) -> np.ndarray | None:
    """``sv`` reshaped to ``shape`` without a copy, or None if that needs a copy."""
    r = sv.reshape(shape)
    if r.size == 0 or np.may_share_memory(r, sv):
        return r
    return None


class _Plan:
    """How one array is reduced along ``axes``: rows (trailing), cols (leading) or a copy."""

    def __init__(self, sv: np.ndarray, axes: tuple[int, ...]):
        nd = sv.ndim
        kept = tuple(i for i in range(nd) if i not in axes)
        self.kept_shape = tuple(sv.shape[i] for i in kept)
        m = math.prod(self.kept_shape)
        k = math.prod(sv.shape[i] for i in axes)
        self.copied_from: np.ndarray | None = None  # transposed view of the caller's data
        x2 = None
        if axes == tuple(range(nd - len(axes), nd)):
            self.kind = "rows"
            x2 = _as_2d(sv, (m, k))
        elif axes == tuple(range(len(axes))):
            self.kind = "cols"
            x2 = _as_2d(sv, (k, m))
        if x2 is None:  # middle axes or non-contiguous data: copy in
            self.kind = "rows"
            self.copied_from = sv.transpose(kept + axes)
            # Always a fresh buffer: ``scale`` works on it in place, and a transposed
            # view can already be C-contiguous (size-1 axes, channels_last tensors),
            # where ``np.ascontiguousarray`` would hand back the caller's own memory.
            x2 = np.array(self.copied_from, order="C", copy=True).reshape(m, k)
        self.x2 = x2
        self.perm = kept + axes

    def pow_sums(self, pcode: int, p: float, inv: np.ndarray | None = None) -> np.ndarray:
        n_slices = self.x2.shape[0] if self.kind == "rows" else self.x2.shape[1]
        inv = np.ones(n_slices) if inv is None else inv
        if self.kind == "rows":
            return run("rows_pow_sum", self.x2.size, self.x2, pcode, p, inv)
        return run("cols_pow_sum", self.x2.size, self.x2, pcode, p, inv, cfg.COL_TILE)

    def norms(self, pcode: int, p: float, wide: bool) -> np.ndarray:
        """Norm of every slice, rescaled by its max where power sums over/underflow."""
        totals = self.pow_sums(pcode, p)
        values = root(totals, pcode, p)
        if needs_rescale(pcode, wide):
            bad = ~((totals > SAFE_LO) & (totals < SAFE_HI))
            if bad.any():
                maxes = self.pow_sums(0, p)
                fix = bad & (maxes > 0) & (maxes < math.inf)
                if fix.any():
                    inv = np.where(fix, pow2_inverse(np.where(fix, maxes, 1.0)), 1.0)
                    scaled = root(self.pow_sums(3, p, inv), 3, p) / inv
                    values = np.where(fix, scaled, values)
        return np.asarray(values, np.float64)

    def scale(self, coefs: np.ndarray, out_sv: np.ndarray | None) -> None:
        """Multiply each reduced slice by its coefficient: into ``out_sv`` or in place."""
        x2 = self.x2
        if self.copied_from is not None:
            run("rows_scale", x2.size, x2, x2, coefs, True)
            target = self.copied_from if out_sv is None else out_sv.transpose(self.perm)
            target[...] = x2.reshape(target.shape)
            return
        dst = x2 if out_sv is None else out_sv.reshape(x2.shape)
        if self.kind == "rows":
            run("rows_scale", x2.size, x2, dst, coefs, dst is x2)
        else:
            run("cols_scale", x2.size, x2, dst, coefs, dst is x2, cfg.COL_TILE)


def _flat_norm(sv: np.ndarray, pcode: int, p: float) -> float:
    flat = sv.reshape(-1)  # a copy when sv is not contiguous: read-only use
    wide = norm_dtype(sv.dtype) == np.float64

    def pow_sum(pc: int, pp: float, inv: float) -> float:
        return float(run("arr_pow_sum", flat.size, flat, pc, pp, inv, cfg.CHUNK))

    return robust_norm(pow_sum, pcode, p, wide)


def norm(
    lib: Any, x: Any, pcode: int, p: float, axes: tuple[int, ...] | None, keepdims: bool
) -> Any:
    sv = float_storage(lib, x, "norm")
    dtype = norm_dtype(sv.dtype)
    if axes is None or len(axes) == sv.ndim:
        value = _flat_norm(sv, pcode, p)
        shape = (1,) * sv.ndim if keepdims else ()
        return lib.wrap(np.full(shape, value), dtype, x)
    plan = _Plan(sv, axes)
    values = plan.norms(pcode, p, dtype == np.float64).reshape(plan.kept_shape)
    if keepdims:
        values = values.reshape(tuple(1 if i in axes else s for i, s in enumerate(sv.shape)))
    return lib.wrap(values, dtype, x)


def rescale(
    lib: Any,
    x: Any,
    pcode: int,
    p: float,
    axes: tuple[int, ...] | None,
    max_norm: float,
    eps: float,
    mode: str,
    inplace: bool,
) -> tuple[Any, Any]:
    """clip_by_norm / normalize, whole array or per slice: returns (output, norms before)."""
    what = "clip_by_norm" if mode == "clip" else "normalize"
    sv = float_storage(lib, x, what)
    if inplace and not lib.writeable(x):
        raise ValueError(f"{what}_ got a read-only array; {out_of_place_hint(what)}")
    if inplace and not sv.flags.c_contiguous:
        check_self_overlap(sv.shape, sv.strides, what)
    dtype = norm_dtype(sv.dtype)
    out = x if inplace else lib.empty_like(x)
    out_sv = sv if inplace else lib.storage(out)
    if axes is None or len(axes) == sv.ndim:
        value = _clip_whole(sv, out_sv, pcode, p, max_norm, eps, mode)
        norms: Any = lib.wrap(value, dtype, x)
    else:
        plan = _Plan(sv, axes)
        values = plan.norms(pcode, p, dtype == np.float64)
        plan.scale(clip_coefficients(values, max_norm, eps, mode), None if inplace else out_sv)
        norms = lib.wrap(values.reshape(plan.kept_shape), dtype, x)
    if inplace:
        lib.touched([x])
    return out, norms


def _clip_whole(
    sv: np.ndarray, out_sv: np.ndarray, pcode: int, p: float, max_norm: float, eps: float, mode: str
) -> float:
    """Norm of all of ``sv`` and the scaled result into ``out_sv`` (which may be ``sv``)."""
    inplace = out_sv is sv
    contiguous = sv.flags.c_contiguous
    src = sv.reshape(-1) if contiguous else np.ascontiguousarray(sv).reshape(-1)
    dst = src if inplace else out_sv.reshape(-1)  # out_sv is freshly allocated, contiguous
    if mode == "clip" and (pcode < 2 or (pcode == 2 and sv.dtype not in _WIDE_STORAGE)):
        value = float(
            run("arr_clip", src.size, src, dst, pcode, p, max_norm, eps, dst is src, cfg.CHUNK)
        )
    else:
        value = _flat_norm(src, pcode, p)
        coef = float(clip_coefficients(np.float64(value), max_norm, eps, mode))
        run("arr_scale", src.size, src, dst, coef, dst is src, cfg.CHUNK)
    if inplace and not contiguous:
        sv[...] = src.reshape(sv.shape)  # copy out
    return value


# Storage dtypes whose norms are float64 (and may need max-rescaling for L2).
_WIDE_STORAGE = frozenset((np.dtype(np.float64), np.dtype(np.complex128)))


def clip_by_value(lib: Any, x: Any, lo: float | None, hi: float | None, inplace: bool) -> Any:
    if inplace and not lib.writeable(x):
        raise ValueError(
            f"clip_by_value_ got a read-only array; {out_of_place_hint('clip_by_value')}"
        )
    sv = lib.storage(x)
    if sv.dtype.kind == "c":
        raise TypeError("clip_by_value is not defined for complex arrays (they have no order)")
    if sv.dtype.kind not in "biuf":
        raise TypeError(
            f"clip_by_value needs numeric arrays (bool, integer or floating), got {sv.dtype}"
        )
    if inplace and not sv.flags.c_contiguous:
        check_self_overlap(sv.shape, sv.strides, "clip_by_value")
    out = x if inplace else lib.empty_like(x)
    out_sv = sv if inplace else lib.storage(out)
    if not lib.is_float(x):
        # Integer and bool data: NumPy's own clip, which is exact for them.
        _clip_integers(sv, out_sv, lo, hi)
    else:
        vmin = -math.inf if lo is None else lo
        vmax = math.inf if hi is None else hi
        contiguous = sv.flags.c_contiguous
        src = sv.reshape(-1) if contiguous else np.ascontiguousarray(sv).reshape(-1)
        dst = out_sv.reshape(-1) if not inplace else src  # fresh outputs are contiguous
        run("arr_clamp", src.size, src, dst, vmin, vmax, dst is src, cfg.CHUNK)
        if inplace and not contiguous:
            sv[...] = src.reshape(sv.shape)  # copy out
    if inplace:
        lib.touched([x])
    return out


def _clip_integers(sv: np.ndarray, out_sv: np.ndarray, lo: float | None, hi: float | None) -> None:
    if sv.dtype.kind == "b":  # bool: clamp 0/1 as int8 within [0, 1], then back to bool
        lo_b, hi_b = int_bound(lo, 0, 1, True), int_bound(hi, 0, 1, False)
        out_sv[...] = np.clip(sv.astype(np.int8), lo_b, hi_b) != 0
        return
    info = np.iinfo(sv.dtype)
    lo_v = int_bound(lo, int(info.min), int(info.max), True)
    hi_v = int_bound(hi, int(info.min), int(info.max), False)
    if lo_v is None and hi_v is None:
        out_sv[...] = sv
        return
    np.clip(sv, lo_v, hi_v, out=out_sv)


# -------------------------------------------------------------- many arrays


class _Table:
    """One storage dtype's arrays as parallel (address, size) columns."""

    __slots__ = ("addrs", "like", "n", "sizes")

    def __init__(
        self, like: np.ndarray, addrs: np.ndarray, sizes: np.ndarray, n: int | None = None
    ):
        self.like = like
        self.addrs = addrs
        self.sizes = sizes
        self.n = int(sizes.sum()) if n is None else n


class _Packed:
    """Arrays of one call grouped into tables, plus copies to write back."""

    def __init__(self) -> None:
        self.tables: list[_Table] = []
        self.dtype: np.dtype | None = None  # norm dtype (float64 if any group is wide)
        self.copies: list[tuple[np.ndarray, np.ndarray]] = []  # (caller view, contiguous copy)
        self.extents: list[tuple[int, int, Any]] = []  # (start, end, view) for overlap checks

    def norm(self, pcode: int, p: float) -> float:
        """Global norm of all tables, rescaled where power sums over/underflow."""
        return robust_norm(self.total_pow_sum, pcode, p, self.dtype == np.float64)

    def total_pow_sum(self, pcode: int, p: float, inv: float = 1.0) -> float:
        total = 0.0
        for t in self.tables:
            s = float(run("tab_pow_sum", t.n, t.addrs, t.sizes, t.like, pcode, p, inv, cfg.CHUNK))
            if pcode != 0:
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


def pack(lib: Any, arrays: Sequence[Any], what: str, writing: bool) -> _Packed:
    """Validate every array (dtype, device, writeability, overlaps) and build the tables.

    Nothing is written here; a bad array anywhere raises before any kernel runs.
    """
    packed = _Packed()
    if lib is NumpyLib:
        if _fast_numpy_pack(arrays if type(arrays) is list else list(arrays), packed, writing):
            return packed
        route_of_many(arrays)  # the full library check that the API deferred to us
        rows = [_numpy_row(a, what, writing) for a in arrays]
    else:
        if _fast_torch_pack(arrays, packed, writing):
            return packed
        rows = _torch_rows(arrays, what, writing)
    groups: dict[np.dtype, tuple[list[int], list[int]]] = {}
    for storage_dtype, addr, size, view, copy in rows:
        if copy is not None:
            packed.copies.append((view, copy))
        if writing and size:
            if copy is None:  # contiguous: its bytes are exactly [addr, addr + nbytes)
                packed.extents.append((addr, addr + size * storage_dtype.itemsize, None))
            else:
                start, end = np.lib.array_utils.byte_bounds(view)
                packed.extents.append((start, end, view))
        g = groups.setdefault(storage_dtype, ([], []))
        g[0].append(addr)
        g[1].append(size)
    for storage_dtype, (addrs, sizes) in groups.items():
        packed.tables.append(
            _Table(_like(storage_dtype), np.array(addrs, np.int64), np.array(sizes, np.int64))
        )
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


def _fast_torch_pack(tensors: Sequence[Any], packed: _Packed, writing: bool) -> bool:
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
    addrs = np.fromiter(map(T.data_ptr, tensors), np.int64, n)
    sizes = np.fromiter(map(T.numel, tensors), np.int64, n)
    if writing and not run_serial("extents_disjoint", addrs, sizes, storage_dtype.itemsize):
        raise_first_overlap(addrs, sizes, storage_dtype.itemsize)
    packed.tables.append(_Table(_like(storage_dtype), addrs, sizes))
    packed.dtype = norm_dtype(storage_dtype)
    return True


# NumPy headers in bulk --------------------------------------------------

# PyArrayObject_fields: ob_refcnt, ob_type, data, nd (int, padded), dimensions,
# strides, base, descr, flags; PyListObject: ob_refcnt, ob_type, ob_size, ob_item.
# Checked against NumPy and CPython themselves before first use.
_OFFSETS = np.array([8, 16, 24, 32, 56, 64, 24], np.int64)
_headers_ok: bool | None = None


def _read_headers(arrays: list[Any], dtype: np.dtype, writing: bool = False) -> tuple[Any, ...]:
    """(addrs, sizes, status, n_bad, disjoint, total) of a list, from one kernel call."""
    return run_serial(  # type: ignore[no-any-return]
        "numpy_headers",
        id(arrays),
        len(arrays),
        id(np.ndarray),
        id(dtype),
        _OFFSETS,
        dtype.itemsize,
        writing,
    )


def _check_headers() -> bool:
    """Does reading headers from memory give NumPy's own answers on this build?"""
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    probes: list[Any] = [
        np.zeros((3, 5), np.float32),
        np.zeros((4, 6), np.float32)[:, ::2],
        np.zeros(7, np.float32)[1:],
        np.zeros((2, 3, 4), np.float32),
        np.zeros(0, np.float32),
        ro,
        np.zeros(3, np.float64),
        [1.0],
    ]
    try:
        addrs, sizes, status = _read_headers(probes, np.dtype(np.float32))[:3]
        for i, a in enumerate(probes):
            ok = (
                type(a) is np.ndarray
                and a.dtype == np.float32
                and a.flags.c_contiguous
                and a.flags.writeable
                and a.flags.aligned
            )
            if bool(status[i] == 0) != ok:
                return False
            if ok and (sizes[i] != a.size or (a.size and addrs[i] != a.ctypes.data)):
                return False
        return True
    except Exception:  # pragma: no cover - an unexpected ABI: use the slow path
        return False


def _fast_numpy_pack(arrays: list[Any], packed: _Packed, writing: bool) -> bool:
    """Read all headers in one kernel call when every array is a plain contiguous one.

    ``a.ctypes.data`` alone costs ~3 us per array; this costs a few ns.  Any
    array that is not an exact, aligned, writeable, C-contiguous ndarray of the
    first array's dtype (float32/float64) sends the call to the slow path.
    """
    global _headers_ok
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
    if _headers_ok is None:
        _headers_ok = _check_headers()
    if not _headers_ok:
        return False
    addrs, sizes, _, n_bad, disjoint, total = _read_headers(arrays, dtype, writing)
    if n_bad:
        return False
    if not disjoint:  # overlap, or an order too scrambled to check in the kernel
        raise_first_overlap(addrs, sizes, dtype.itemsize)
    packed.tables.append(_Table(_like(dtype), addrs, sizes, total))
    packed.dtype = norm_dtype(dtype)
    return True


# ------------------------------------------------------------ global calls


def global_norm(lib: Any, arrays: Sequence[Any], pcode: int, p: float) -> Any:
    packed = pack(lib, arrays, "norm", writing=False)
    value = packed.norm(pcode, p)
    assert packed.dtype is not None
    return lib.wrap(value, packed.dtype, arrays[0])


def clip_global(
    lib: Any,
    arrays: list[Any],
    max_norm: float,
    pcode: int,
    p: float,
    eps: float,
    total_norm: float | None,
    error_if_nonfinite: bool,
    inplace: bool,
) -> tuple[list[Any], Any]:
    """Global-norm clipping of a list: returns (outputs, total norm before clipping)."""
    what = "clip_by_global_norm"
    if not inplace:
        src = pack(lib, arrays, what, writing=False)
        outs = [lib.empty_like(a) for a in arrays]
        dst = pack(lib, outs, what, writing=False)
        value = src.norm(pcode, p) if total_norm is None else total_norm
        _raise_if_nonfinite(value, error_if_nonfinite)
        coef = float(clip_coefficients(np.float64(value), max_norm, eps, "clip"))
        _scale_into(src, dst, coef)
        assert src.dtype is not None
        return outs, lib.wrap(value, src.dtype, arrays[0])

    if len(arrays) == 1 and total_norm is None and not error_if_nonfinite:
        out, norm_value = rescale(lib, arrays[0], pcode, p, None, max_norm, eps, "clip", True)
        return [out], norm_value
    packed = pack(lib, arrays, what, writing=True)
    if (
        len(packed.tables) == 1
        and not packed.copies
        and total_norm is None
        and not error_if_nonfinite
        and not needs_rescale(pcode, packed.dtype == np.float64)
    ):
        t = packed.tables[0]
        args = (t.addrs, t.sizes, t.like, pcode, p, max_norm, eps, cfg.CHUNK)
        value = float(run("tab_clip", t.n, *args))
    else:
        value = packed.norm(pcode, p) if total_norm is None else total_norm
        _raise_if_nonfinite(value, error_if_nonfinite)
        packed.scale(float(clip_coefficients(np.float64(value), max_norm, eps, "clip")))
    lib.touched(arrays)
    assert packed.dtype is not None
    return arrays, lib.wrap(value, packed.dtype, arrays[0])


def _scale_into(src: _Packed, dst: _Packed, coef: float) -> None:
    for ts, td in zip(src.tables, dst.tables):
        run("tab_scale", ts.n, ts.addrs, td.addrs, ts.sizes, ts.like, coef, False, cfg.CHUNK)


def _raise_if_nonfinite(value: float, error_if_nonfinite: bool) -> None:
    if error_if_nonfinite and not math.isfinite(value):
        raise NonFiniteNormError(nonfinite_message(value))


def clamp_many_(lib: Any, arrays: list[Any], lo: float | None, hi: float | None) -> None:
    packed = pack(lib, arrays, "clip_by_value", writing=True)
    packed.clamp(-math.inf if lo is None else lo, math.inf if hi is None else hi)
    lib.touched(arrays)


def scale_(lib: Any, arrays: list[Any], factor: float) -> None:
    packed = pack(lib, arrays, "scale", writing=True)
    packed.scale(factor)
    lib.touched(arrays)
