"""GPU route: CuPy kernels on CuPy arrays and torch CUDA tensors, without host syncs.

Flow of a global-norm clip (one dtype): upload (or reuse) the tensor table,
``fastclip_partial_pow_sum`` writes one float64 partial per chunk,
``fastclip_finish`` reduces them and writes the norm and the clip coefficient
to device memory, ``fastclip_scale`` reads the coefficient there.  Three
launches per call (plus one partial and one scale per extra dtype), whatever
the number of tensors, and the host never waits for the device: results are
0-d device arrays.  Only ``error_if_nonfinite=True`` reads the norm back (one
synchronisation, documented).

Kernels run on torch's current stream for CUDA tensors and on CuPy's current
stream for CuPy arrays.  Scratch memory comes from the same library's
stream-ordered allocator.
"""

from __future__ import annotations

import collections
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _config as cfg
from .._errors import NonFiniteNormError, nonfinite_message, raise_overlap
from .._formulas import int_bound
from .._memory import check_self_overlap, overlapping_extents
from . import _plan, _source
from ._libs import lib_for

__all__ = ["lib_for"]

_CPP = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}


# ----------------------------------------------------------------- kernels


def _include_options() -> tuple[str, ...]:
    """-I flags for cuda_fp16.h / cuda_bf16.h.

    Searched where CuPy itself finds CUDA (``cupy._environment.get_cuda_path``),
    then CUDA_PATH / CUDA_HOME / /usr/local/cuda, then the NVIDIA pip wheels
    (``nvidia/cu13/include`` or ``nvidia/cuda_runtime/include``).
    """
    roots: list[str] = []
    try:
        from cupy import _environment

        roots.append(_environment.get_cuda_path() or "")
    except Exception:  # pragma: no cover - older CuPy layouts
        pass
    roots += [os.environ.get("CUDA_PATH", ""), os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    try:
        import nvidia  # type: ignore[import-not-found]

        for base in nvidia.__path__:
            roots += [os.path.join(base, d) for d in sorted(os.listdir(base))]
    except ImportError:
        pass
    dirs: list[str] = []
    for root in roots:
        inc = os.path.join(root, "include") if root else ""
        if inc and os.path.isfile(os.path.join(inc, "cuda_fp16.h")) and inc not in dirs:
            dirs.append(inc)
    return tuple(f"-I{d}" for d in dirs)


@functools.cache
def _module(device_id: int) -> Any:
    """The RawModule of kernels.cu for one device, built on first use."""
    return raw_module(device_id, _source.source(), _source.name_expressions())


def raw_module(device_id: int, code: str, names: list[str]) -> Any:
    """``cupy.RawModule`` of ``code`` on one device with the instantiations ``names``
    (C++17, the CUDA include folders that hold cuda_fp16.h/cuda_bf16.h)."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(
            code=code, options=("-std=c++17", *_include_options()), name_expressions=names
        )


def _kernel(device_id: int, name: str, targ: str) -> Any:
    return _module(device_id).get_function(f"{name}<{targ}>")


def _u64(ptr: int) -> np.uint64:
    return np.uint64(ptr)


def _ptr(arr: Any, lib: Any) -> np.uint64:
    return _u64(lib.ptr(arr))


# ------------------------------------------------------------------ tables

_TABLES: collections.OrderedDict[tuple[Any, ...], tuple[Any, Any]] = collections.OrderedDict()


def _device_table(lib: Any, like: Any, buf: np.ndarray) -> Any:
    """The table on the device, uploaded once per (device, stream, content) and cached.

    Gradients usually keep their addresses from step to step, so the common case
    uploads nothing; a cached table also makes CUDA-graph capture copy-free.
    """
    key = (lib.name, lib.device_id(like), lib.stream_id(like), buf.tobytes())
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit[0]
    dev, pinned = lib.upload(buf, like)
    _TABLES[key] = (dev, pinned)  # the pinned source stays alive as long as the copy
    while len(_TABLES) > cfg.GPU_TABLE_CACHE:
        _TABLES.popitem(last=False)
    return dev


class _Group:
    """Arrays of one dtype as a device table (pointers, sizes, chunk table)."""

    def __init__(self, lib: Any, kind: str, ptrs: list[int], sizes: list[int], like: Any):
        buf, self.n, self.n_chunks = _plan.pack_table(ptrs, sizes, cfg.GPU_CHUNK)
        self.kind = kind
        self.numel = int(sum(sizes))
        self.table = _device_table(lib, like, buf)
        base = lib.ptr(self.table)
        n, nc = self.n, self.n_chunks
        self.ptrs = _u64(base)
        self.sizes = _u64(base + 8 * n)
        self.chunk_tensor = _u64(base + 16 * n)
        self.chunk_start = _u64(base + 16 * n + 8 * nc)


class _Packed:
    """Validated arrays of one call, grouped by dtype, with copies to write back."""

    def __init__(self, lib: Any, arrays: Sequence[Any], what: str, writing: bool):
        self.lib = lib
        self.like = arrays[0]
        self.device = lib.device_id(arrays[0])
        self.copies: list[tuple[Any, Any]] = []
        by_kind: dict[str, tuple[list[int], list[int]]] = {}
        extents = []
        for a in arrays:
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
                itemsize = 8 if kind == "float64" else (4 if kind == "float32" else 2)
                extents.append((lib.ptr(a), lib.ptr(a) + lib.numel(a) * itemsize))
            ptrs, sizes = by_kind.setdefault(kind, ([], []))
            ptrs.append(lib.ptr(buf))
            sizes.append(lib.numel(buf))
        if writing and len(extents) > 1:
            starts = np.array([e[0] for e in extents], np.uint64).view(np.int64)
            ends = np.array([e[1] for e in extents], np.uint64).view(np.int64)
            for i, j in overlapping_extents(starts, ends):
                raise_overlap(i, j)
        self._keepalive = [c for _, c in self.copies]
        self.groups = [_Group(lib, k, p, s, self.like) for k, (p, s) in by_kind.items()]
        self.norm_kind = "float64" if "float64" in by_kind else "float32"

    def _launch(self, name: str, g: _Group, head: tuple[Any, ...], tail: tuple[Any, ...]) -> None:
        """One launch of a table kernel: ``name(*head, sizes, chunk table, *tail)``."""
        k = _kernel(self.device, name, _CPP[g.kind])
        grid = _plan.grid_size(g.n_chunks, cfg.GPU_MAX_BLOCKS)
        table = (g.sizes, g.chunk_tensor, g.chunk_start, np.int64(g.n_chunks))
        k((grid,), (cfg.GPU_BLOCK,), (*head, *table, np.int64(cfg.GPU_CHUNK), *tail))

    def launch_partials(self, partials: Any, pcode: int, p: float) -> int:
        """One partial-sum launch per dtype; returns the number of partials written."""
        offset = 0
        base = self.lib.ptr(partials)
        for g in self.groups:
            if g.n_chunks:
                tail = (np.int32(pcode), np.float64(p), _u64(base + 8 * offset))
                self._launch("fastclip_partial_pow_sum", g, (g.ptrs,), tail)
            offset += g.n_chunks
        return offset

    def launch_scale(self, dst: _Packed | None, coef: Any) -> None:
        for i, g in enumerate(self.groups):
            if g.n_chunks:
                d = g if dst is None else dst.groups[i]
                self._launch("fastclip_scale", g, (g.ptrs, d.ptrs), (_ptr(coef, self.lib),))
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
        self, pcode: int, p: float, max_norm: float, eps: float, mode: int, given: Any = None
    ) -> tuple[Any, Any]:
        """Partials -> (0-d norm, 0-d float64 coefficient), all on the device."""
        lib = self.lib
        n_chunks = sum(g.n_chunks for g in self.groups)
        partials = lib.empty((max(1, n_chunks),), "float64", self.like)
        self.launch_partials(partials, pcode, p)
        norm = lib.empty((), self.norm_kind, self.like)
        coef = lib.empty((), "float64", self.like)
        k = _kernel(self.device, "fastclip_finish", _CPP[self.norm_kind])
        args = (
            _ptr(partials, lib),
            np.int64(n_chunks),
            np.int32(pcode),
            np.float64(p),
            np.float64(max_norm),
            np.float64(eps),
            np.int32(mode),
            _u64(0) if given is None else _ptr(given, lib),
            _ptr(norm, lib),
            _ptr(coef, lib),
        )
        k((1,), (cfg.GPU_FINISH_BLOCK,), args)
        return norm, coef


def _on_device(lib: Any, like: Any) -> Any:
    import contextlib

    import cupy

    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(lib.device_id(like)))
    stack.enter_context(lib.stream(like))
    return stack


def _raise_if_nonfinite(lib: Any, norm: Any) -> None:
    value = lib.host_float(norm)  # the one documented synchronisation
    if not math.isfinite(value):
        raise NonFiniteNormError(nonfinite_message(value))


# ------------------------------------------------------------ public flows


def global_norm(lib: Any, arrays: Sequence[Any], pcode: int, p: float) -> Any:
    with _on_device(lib, arrays[0]):
        packed = _Packed(lib, arrays, "norm", writing=False)
        return packed.finish(pcode, p, 0.0, 0.0, 0)[0]


def clip_global(
    lib: Any,
    arrays: list[Any],
    max_norm: float,
    pcode: int,
    p: float,
    eps: float,
    total_norm: Any,
    error_if_nonfinite: bool,
    inplace: bool,
) -> tuple[list[Any], Any]:
    with _on_device(lib, arrays[0]):
        src = _Packed(lib, arrays, "clip_by_global_norm", writing=inplace)
        given = None
        if total_norm is not None:
            given = (
                lib.to_f64(total_norm)
                if hasattr(total_norm, "shape")
                else lib.full_f64(float(total_norm), arrays[0])
            )
        norm, coef = src.finish(pcode, p, max_norm, eps, 1, given)
        if error_if_nonfinite:
            _raise_if_nonfinite(lib, norm)
        if inplace:
            src.launch_scale(None, coef)
            lib.touched(arrays)
            return arrays, norm
        outs = [lib.empty_like(a) for a in arrays]
        dst = _Packed(lib, outs, "clip_by_global_norm", writing=False)
        src.launch_scale(dst, coef)
        return outs, norm


def scale_(lib: Any, arrays: list[Any], factor: Any) -> None:
    with _on_device(lib, arrays[0]):
        packed = _Packed(lib, arrays, "scale_", writing=True)
        coef = (
            lib.to_f64(factor)
            if hasattr(factor, "shape")
            else lib.full_f64(float(factor), arrays[0])
        )
        packed.launch_scale(None, coef)
        lib.touched(arrays)


def clamp_many_(lib: Any, arrays: list[Any], lo: float | None, hi: float | None) -> None:
    with _on_device(lib, arrays[0]):
        packed = _Packed(lib, arrays, "clip_by_value", writing=True)
        packed.launch_clamp(-math.inf if lo is None else lo, math.inf if hi is None else hi)
        lib.touched(arrays)


def _integer_bounds(x: Any, lo: float | None, hi: float | None) -> tuple[Any, Any]:
    """Float bounds saturated to the integer (or bool: 0/1) range of ``x``'s dtype,
    so inf and 1e30 neither overflow nor wrap (see ``int_bound``)."""
    name = str(x.dtype).replace("torch.", "")
    if name == "bool":
        lo_end, hi_end = 0, 1
    else:
        info = np.iinfo(np.dtype(name))
        lo_end, hi_end = int(info.min), int(info.max)
    return int_bound(lo, lo_end, hi_end, True), int_bound(hi, lo_end, hi_end, False)


def clip_by_value(lib: Any, x: Any, lo: float | None, hi: float | None, inplace: bool) -> Any:
    if not lib.is_float(x):
        out = x if inplace else lib.empty_like(x)
        lo_i, hi_i = _integer_bounds(x, lo, hi)
        with _on_device(lib, x):
            lib.clip_integers(x, out, lo_i, hi_i)  # the library's own clip for integers
        return out
    if lib.kind(x) is None:
        raise TypeError(f"clip_by_value on the GPU does not support {x.dtype}")
    with _on_device(lib, x):
        out = x if inplace else lib.empty_like(x)
        if not inplace:
            lib.write_back(out, x)  # device-to-device copy, then clamp in place
        packed = _Packed(lib, [out], "clip_by_value", writing=True)
        packed.launch_clamp(-math.inf if lo is None else lo, math.inf if hi is None else hi)
    if inplace:
        lib.touched([x])
    return out


# -------------------------------------------------------- single arrays, axes


def _axis_layout(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[str, int, int]:
    """('rows', m, k) for trailing reduction axes, ('cols', k, m) for leading, else ('copy', m, k)."""
    nd = len(shape)
    kept = [i for i in range(nd) if i not in axes]
    m = math.prod(shape[i] for i in kept)
    k = math.prod(shape[i] for i in axes)
    if axes == tuple(range(nd - len(axes), nd)):
        return "rows", m, k
    if axes == tuple(range(len(axes))):
        return "cols", k, m
    return "copy", m, k


def _axis_norms(
    lib: Any,
    x2: Any,
    layout: str,
    a: int,
    b: int,
    pcode: int,
    p: float,
    max_norm: float,
    eps: float,
    mode: int,
    norm_kind: str,
    like: Any,
) -> tuple[Any, Any]:
    """Per-slice norms and coefficients of a contiguous 2-D view ([m, k] rows or [k, m] cols)."""
    device = lib.device_id(like)
    kind = lib.kind(like)
    n_slices = a if layout == "rows" else b
    pow_sums = lib.empty((max(1, n_slices),), "float64", like)
    if layout == "rows":
        k = _kernel(device, "fastclip_rows_pow_sum", _CPP[kind])
        k(
            (_plan.grid_size(a, cfg.GPU_MAX_BLOCKS),),
            (cfg.GPU_BLOCK,),
            (
                _ptr(x2, lib),
                np.int64(a),
                np.int64(b),
                np.int32(pcode),
                np.float64(p),
                _ptr(pow_sums, lib),
            ),
        )
    else:
        k = _kernel(device, "fastclip_cols_pow_sum", _CPP[kind])
        grid = _plan.elementwise_grid(b, cfg.GPU_BLOCK, cfg.GPU_MAX_BLOCKS)
        k(
            (grid,),
            (cfg.GPU_BLOCK,),
            (
                _ptr(x2, lib),
                np.int64(a),
                np.int64(b),
                np.int32(pcode),
                np.float64(p),
                _ptr(pow_sums, lib),
            ),
        )
    norms = lib.empty((n_slices,), norm_kind, like)
    coefs = lib.empty((max(1, n_slices),), "float64", like)
    k = _kernel(device, "fastclip_axis_coefs", _CPP[norm_kind])
    grid = _plan.elementwise_grid(n_slices, cfg.GPU_BLOCK, cfg.GPU_MAX_BLOCKS)
    k(
        (grid,),
        (cfg.GPU_BLOCK,),
        (
            _ptr(pow_sums, lib),
            np.int64(n_slices),
            np.int32(pcode),
            np.float64(p),
            np.float64(max_norm),
            np.float64(eps),
            np.int32(mode),
            _ptr(norms, lib),
            _ptr(coefs, lib),
        ),
    )
    return norms, coefs


def _axis_scale(lib: Any, src: Any, dst: Any, n: int, inner: int, outer: int, coefs: Any) -> None:
    k = _kernel(lib.device_id(src), "fastclip_axis_scale", _CPP[lib.kind(src)])
    grid = _plan.elementwise_grid(n, cfg.GPU_BLOCK, cfg.GPU_MAX_BLOCKS)
    k(
        (grid,),
        (cfg.GPU_BLOCK,),
        (
            _ptr(src, lib),
            _ptr(dst, lib),
            np.int64(n),
            np.int64(inner),
            np.int64(outer),
            _ptr(coefs, lib),
        ),
    )


def _check_kind(lib: Any, x: Any, what: str) -> str:
    kind = lib.kind(x)
    if kind is None:
        raise TypeError(
            f"{what} on the GPU needs float16, bfloat16, float32 or float64 arrays, got {x.dtype}"
        )
    return kind


def norm(
    lib: Any, x: Any, pcode: int, p: float, axes: tuple[int, ...] | None, keepdims: bool
) -> Any:
    _check_kind(lib, x, "norm")
    shape = tuple(x.shape)
    if axes is None or len(axes) == len(shape):
        value = global_norm(lib, [x], pcode, p)
        return lib.reshape(value, (1,) * len(shape)) if keepdims else value
    _, norms = _rescale_axes(lib, x, pcode, p, axes, 0.0, 0.0, 0, None)
    kept = tuple(s for i, s in enumerate(shape) if i not in axes)
    if keepdims:
        kept = tuple(1 if i in axes else s for i, s in enumerate(shape))
    return lib.reshape(norms, kept)


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
    what = "clip_by_norm" if mode == "clip" else "normalize"
    _check_kind(lib, x, what)
    if inplace and not lib.contiguous(x):
        check_self_overlap(tuple(x.shape), lib.strides(x), what)
    mode_code = 1 if mode == "clip" else 2
    shape = tuple(x.shape)
    out = x if inplace else lib.empty_like(x)
    if axes is None or len(axes) == len(shape):
        with _on_device(lib, x):
            src = _Packed(lib, [x], what, writing=False)
            norm_value, coef = src.finish(pcode, p, max_norm, eps, mode_code)
            dst = None if inplace else _Packed(lib, [out], what, writing=False)
            src.launch_scale(dst, coef)
    else:
        _, norms = _rescale_axes(lib, x, pcode, p, axes, max_norm, eps, mode_code, out)
        kept = tuple(s for i, s in enumerate(shape) if i not in axes)
        norm_value = lib.reshape(norms, kept)
    if inplace:
        lib.touched([x])
    return out, norm_value


def _rescale_axes(
    lib: Any,
    x: Any,
    pcode: int,
    p: float,
    axes: tuple[int, ...],
    max_norm: float,
    eps: float,
    mode: int,
    out: Any,
) -> tuple[Any, Any]:
    """Norms along ``axes`` and, when ``out`` is given, the scaled result written there."""
    shape = tuple(x.shape)
    layout, a, b = _axis_layout(shape, axes)
    norm_kind = "float64" if lib.kind(x) == "float64" else "float32"
    with _on_device(lib, x):
        if layout != "copy" and lib.contiguous(x):
            x2 = lib.reshape(x, (a, b))
            norms, coefs = _axis_norms(
                lib, x2, layout, a, b, pcode, p, max_norm, eps, mode, norm_kind, x
            )
            if out is not None:  # out is x itself or a fresh contiguous array
                dst = lib.reshape(out, (a, b))
                inner, outer = (b, a) if layout == "rows" else (1, b)
                _axis_scale(lib, x2, dst, a * b, inner, outer, coefs)
            return out, norms
        # Other layouts: copy in as [kept..., reduced...] rows, copy the result out.
        kept = tuple(i for i in range(len(shape)) if i not in axes)
        perm = kept + axes
        m = math.prod(shape[i] for i in kept)
        k = math.prod(shape[i] for i in axes)
        xt = lib.permute(x, perm)
        x2 = lib.reshape(lib.as_contiguous(xt), (m, k))
        norms, coefs = _axis_norms(
            lib, x2, "rows", m, k, pcode, p, max_norm, eps, mode, norm_kind, x
        )
        if out is not None:
            # Scale into a fresh buffer, never into x2: a permuted view that is
            # already contiguous (size-1 axes, channels_last) comes back from
            # ``as_contiguous`` as the caller's own memory, and an out-of-place
            # call must not write it.
            y2 = lib.empty((m, k), lib.kind(x), x)
            _axis_scale(lib, x2, y2, m * k, k, m, coefs)
            lib.write_back(lib.permute(out, perm), lib.reshape(y2, tuple(xt.shape)))
        return out, norms
