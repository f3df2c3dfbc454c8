"""GPU driver of the fused clip-and-step optimizers (AdamW, SGD): ``optim_kernels.cu``.

Flow of one step (all on the caller's stream, the host never waits):

1. the parallel lists (params, grads, state) are validated and grouped by
   dtype; each group becomes one int64 device table
   ``[ptrs of every list | sizes | chunk_tensor | chunk_start]`` (uploaded
   once and cached while the addresses stay the same, ``_driver._device_table``);
2. the clip coefficient comes from the core's global-norm path
   (``_driver._Packed.finish``: ``fastclip_partial_pow_sum`` +
   ``fastclip_finish``), which leaves the norm and ``min(1, max_norm / (norm +
   eps))`` in device memory; with a given device ``total_norm`` only the
   finish kernel runs;
3. one ``fastclip_adamw`` / ``fastclip_sgd`` launch per dtype reads the
   coefficient from device memory and updates every tensor in place.

Hyper-parameters are host scalars passed as kernel arguments; when they
differ between tensors (per-tensor step counts, several parameter groups) the
float64 rows of the CPU kernels' matrix are uploaded instead (async, cached by
content).

Host synchronisations: none, except ``nonfinite="error"`` (reads the norm, or a
device ``clip_coef``, to raise before any write: one sync, as the CPU path
needs the norm on the host).  ``nonfinite="skip"`` is decided by the kernel
itself: it reads the device norm first and returns without writing anything
when it is NaN/inf (so the caller cannot know without reading the returned
norm).

Imports no CuPy at module level: the source/name helpers are used by compile
checks on machines without a GPU, and the host side is tested on the CPU with
NumPy emulations of the kernels (``tests/gpu/emulated/test_gpu_optim_emulated.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

from .. import _config as cfg
from .._errors import NonFiniteNormError, nonfinite_step_message
from .._formulas import clip_coefficient
from .._memory import overlapping_extents
from .._validate import clip_mode, norm_args
from . import _driver, _plan, _source
from ._source import ELEMENT_TYPES

__all__ = [
    "GpuClip",
    "Step",
    "adamw_step_gpu",
    "clip_plan",
    "explicit_instantiations",
    "name_expressions",
    "sgd_step_gpu",
    "source",
]

KERNELS = ("fastclip_adamw", "fastclip_sgd")
#: Number of pointer lists per kernel's table (params first).
LISTS = {"fastclip_adamw": 5, "fastclip_sgd": 3}
#: Guard modes of the kernels (see optim_kernels.cu).
GUARD_NONE, GUARD_NORM_F32, GUARD_NORM_F64, GUARD_COEF = 0, 1, 2, 3


# ------------------------------------------------------------------ source


def own_source() -> str:
    """The text of ``optim_kernels.cu`` alone."""
    return resources.files("fastclip._gpu").joinpath("optim_kernels.cu").read_text()


def source() -> str:
    """What the RawModule compiles: ``kernels.cu`` (element access) then ``optim_kernels.cu``."""
    return _source.source() + "\n" + own_source()


def name_expressions() -> list[str]:
    """Every template instantiation the driver launches (for ``RawModule``)."""
    return [f"{k}<{t}>" for k in KERNELS for t in ELEMENT_TYPES.values()]


def explicit_instantiations() -> str:
    """C++ explicit instantiations of every kernel, for compile checks with nvcc/NVRTC."""
    return _source.instantiations(own_source(), name_expressions())


@functools.cache
def _module(device_id: int) -> Any:
    """The RawModule of optim_kernels.cu for one device, built on first use."""
    return _driver.raw_module(device_id, source(), name_expressions())


def _kernel(device_id: int, name: str, targ: str) -> Any:
    return _module(device_id).get_function(f"{name}<{targ}>")


def _u64(ptr: int) -> np.uint64:
    return np.uint64(ptr)


def _ptr_or_null(lib: Any, arr: Any) -> np.uint64:
    return _u64(0) if arr is None else _u64(lib.ptr(arr))


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


# ------------------------------------------------------------------ tables


class _Group:
    """One dtype's tensors of a step: the device table and their index in the lists."""

    def __init__(
        self,
        lib: Any,
        kind: str,
        index: list[int],
        ptrs: list[list[int]],
        sizes: list[int],
        like: Any,
    ):
        self.kind = kind
        self.index = index
        n = len(sizes)
        tensor, start = _plan.chunk_table(np.asarray(sizes, np.int64), cfg.GPU_CHUNK)
        n_lists = len(ptrs)
        buf = np.empty(n_lists * n + n + 2 * tensor.size, np.int64)
        for k, lst in enumerate(ptrs):
            buf[k * n : (k + 1) * n] = np.asarray(lst, np.uint64).view(np.int64)
        buf[n_lists * n : (n_lists + 1) * n] = sizes
        buf[(n_lists + 1) * n : (n_lists + 1) * n + tensor.size] = tensor
        buf[(n_lists + 1) * n + tensor.size :] = start
        self.n = n
        self.n_chunks = int(tensor.size)
        self.table = _driver._device_table(lib, like, buf)
        base = lib.ptr(self.table)
        self.ptrs = _u64(base)
        self.sizes = _u64(base + 8 * n_lists * n)
        self.chunk_tensor = _u64(base + 8 * (n_lists + 1) * n)
        self.chunk_start = _u64(base + 8 * (n_lists + 1) * n + 8 * self.n_chunks)


class Step:
    """Validated parallel lists of one fused step, grouped by dtype, as device tables.

    ``lists[0]`` are the params; ``None`` lists are placeholders (the params'
    pointers, never touched by the kernel).  Element ``i`` of every list must
    have the dtype and shape of ``params[i]`` and sit on the params' device;
    written lists must not share memory.  Everything is checked before the
    first write; non-contiguous arrays go through contiguous copies that are
    written back after the launch.
    """

    def __init__(
        self, lib: Any, lists: Sequence[Sequence[Any] | None], writing: Sequence[bool], what: str
    ):
        params = lists[0]
        assert params is not None
        n = len(params)
        self.lib = lib
        self.like = params[0]
        self.device = lib.device_id(params[0])
        self.n = n
        kinds = []
        for i, p in enumerate(params):
            kind = lib.kind(p)
            if kind is None:
                raise TypeError(
                    f"{what} on the GPU needs float16, bfloat16, float32 or float64 parameters, "
                    f"got {p.dtype} (parameter {i})"
                )
            kinds.append(kind)
        shapes = [tuple(p.shape) for p in params]
        for k, lst in enumerate(lists):
            if lst is None:
                continue
            if len(lst) != n:
                raise ValueError(f"{what}: list {k} has {len(lst)} arrays, the params list has {n}")
            for i, a in enumerate(lst):
                if k and a.dtype != params[i].dtype:
                    raise TypeError(f"{what}: every array must have the dtype of its parameter")
                if k and tuple(a.shape) != shapes[i]:
                    raise ValueError(f"{what}: every array must have the shape of its parameter")
                if lib.device_id(a) != self.device:
                    raise TypeError(
                        f"{what}: all arrays of one GPU step must be on one device, got devices "
                        f"{self.device} and {lib.device_id(a)}"
                    )
        # contiguous buffers (copies where needed) and the overlap check of written memory
        self.copies: list[tuple[Any, Any]] = []
        bufs: list[list[Any] | None] = []
        starts, ends = [], []
        for lst, w in zip(lists, writing):
            if lst is None:
                bufs.append(None)
                continue
            out = []
            for i, a in enumerate(lst):
                if lib.contiguous(a):
                    out.append(a)
                    if w and lib.numel(a):
                        start = lib.ptr(a)
                        starts.append(start)
                        ends.append(start + lib.numel(a) * _ITEMSIZE[kinds[i]])
                else:
                    c = lib.as_contiguous(a)
                    out.append(c)
                    if w:
                        self.copies.append((a, c))
            bufs.append(out)
        if len(starts) > 1:
            s = np.array(starts, np.uint64).view(np.int64)
            e = np.array(ends, np.uint64).view(np.int64)
            for _ in overlapping_extents(s, e):
                raise ValueError(
                    f"{what}: two of the arrays written in place (parameters, state) share "
                    "memory; pass each piece of memory once"
                )
        by_kind: dict[str, list[int]] = {}
        for i, kind in enumerate(kinds):
            by_kind.setdefault(kind, []).append(i)
        self.groups = []
        pbufs = bufs[0]
        assert pbufs is not None
        for kind, index in by_kind.items():
            ptrs = [[lib.ptr((pbufs if b is None else b)[i]) for i in index] for b in bufs]
            sizes = [lib.numel(pbufs[i]) for i in index]
            self.groups.append(_Group(lib, kind, index, ptrs, sizes, self.like))

    def _rows(self, g: _Group, hp: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(device hp matrix or None, the scalar row) for group ``g``."""
        rows = hp if len(g.index) == self.n else hp[g.index]
        rows = np.ascontiguousarray(rows, np.float64)
        if rows.shape[0] == 1 or bool(np.all(rows == rows[0])):
            return None, rows[0]
        return _driver._device_table(self.lib, self.like, rows.reshape(-1)), rows[0]

    def _launch(
        self, name: str, g: _Group, clip: GpuClip, sign: float, tail: tuple[Any, ...]
    ) -> None:
        k = _kernel(self.device, name, _driver._CPP[g.kind])
        grid = _plan.grid_size(g.n_chunks, cfg.GPU_MAX_BLOCKS)
        args = (
            g.ptrs,
            np.int64(g.n),
            g.sizes,
            g.chunk_tensor,
            g.chunk_start,
            np.int64(g.n_chunks),
            np.int64(cfg.GPU_CHUNK),
            _ptr_or_null(self.lib, clip.coef_dev),
            np.float64(sign * clip.coef_host),
            np.int32(clip.guard_mode),
            _ptr_or_null(self.lib, clip.guard),
            *tail,
        )
        k((grid,), (cfg.GPU_BLOCK,), args)

    def launch_adamw(self, hp: np.ndarray, clip: GpuClip, sign: float, amsgrad: bool) -> None:
        """One ``fastclip_adamw`` launch per dtype (``hp``: rows of _optim_kernels.A_*)."""
        for g in self.groups:
            if not g.n_chunks:
                continue
            dev, row = self._rows(g, hp)
            tail = (
                _ptr_or_null(self.lib, dev),
                *(np.float64(x) for x in row[:7]),
                np.int32(1 if amsgrad else 0),
            )
            self._launch("fastclip_adamw", g, clip, sign, tail)
        self._done()

    def launch_sgd(self, hp: np.ndarray, clip: GpuClip, sign: float) -> None:
        """One ``fastclip_sgd`` launch per dtype (``hp``: rows of _optim_kernels.S_*)."""
        for g in self.groups:
            if not g.n_chunks:
                continue
            dev, row = self._rows(g, hp)
            tail = (
                _ptr_or_null(self.lib, dev),
                *(np.float64(x) for x in row[:4]),
                np.int32(int(row[4])),
                np.int32(1 if row[5] != 0.0 else 0),
            )
            self._launch("fastclip_sgd", g, clip, sign, tail)
        self._done()

    def _done(self) -> None:
        for view, copy in self.copies:
            self.lib.write_back(view, copy)


# ------------------------------------------------------------- clip plans


class GpuClip:
    """The clip part of a fused GPU step.

    The kernel multiplies gradients by ``coef_host * coef_dev[0]`` (``coef_dev``
    a float64 device scalar, or None for 1) and, with a guard, returns before
    writing anything when the guard says so.  ``norm`` is the 0-d device norm
    returned to the caller; ``skip`` a decision already known on the host.
    """

    __slots__ = ("coef_dev", "coef_host", "guard", "guard_mode", "norm", "skip")

    def __init__(self) -> None:
        self.coef_dev: Any = None
        self.coef_host = 1.0
        self.guard: Any = None
        self.guard_mode = GUARD_NONE
        self.norm: Any = None
        self.skip = False


def _full(lib: Any, value: float, kind: str, like: Any) -> Any:
    """A 0-d array of ``kind`` holding ``value`` on ``like``'s device (no sync)."""
    if lib.name == "torch":
        import torch

        return torch.full((), value, dtype=getattr(torch, kind), device=like.device)
    if lib.name == "cupy":
        import cupy

        return cupy.full((), value, dtype=np.dtype(kind))
    out = lib.empty((), kind, like)  # other adapters (the CPU emulation in tests)
    out[...] = value
    return out


def _finish_given(
    lib: Any, given: Any, max_norm: float, eps: float, kind: str, like: Any
) -> tuple[Any, Any]:
    """``fastclip_finish`` on a given device norm (no partial sums): (norm, coefficient)."""
    norm = lib.empty((), kind, like)
    coef = lib.empty((), "float64", like)
    k = _driver._kernel(lib.device_id(like), "fastclip_finish", _driver._CPP[kind])
    args = (
        _u64(0),
        np.int64(0),
        np.int32(2),
        np.float64(2.0),
        np.float64(max_norm),
        np.float64(eps),
        np.int32(1),
        _u64(lib.ptr(given)),
        _u64(lib.ptr(norm)),
        _u64(lib.ptr(coef)),
    )
    k((1,), (cfg.GPU_FINISH_BLOCK,), args)
    return norm, coef


def _check_device(lib: Any, value: Any, like: Any, name: str) -> None:
    if lib.device_id(value) != lib.device_id(like):
        raise TypeError(
            f"{name} is on device {lib.device_id(value)}, the arrays on {lib.device_id(like)}"
        )


def clip_plan(
    lib: Any,
    grads: list[Any],
    max_norm: float | None,
    norm_type: Any,
    total_norm: Any,
    clip_coef: Any,
    eps: Any,
    nonfinite: str,
    what: str,
) -> GpuClip:
    """The GPU twin of ``optim._functional.clip_plan``; nothing is written to the lists.

    ``total_norm`` and ``clip_coef`` are None, a Python float (known on the
    host: decided there, no sync) or a 0-d device array of ``lib`` (used on the
    device).  Raises :class:`fastclip.NonFiniteNormError` for ``"error"``
    (one host sync); ``"skip"`` sets the kernel's guard.
    """
    like = grads[0]
    plan = GpuClip()
    mode = clip_mode(max_norm, total_norm, clip_coef, what)
    if mode == "coef":
        if isinstance(clip_coef, float):
            plan.coef_host = clip_coef
            if not clip_coef >= 0.0:
                if nonfinite == "error":
                    raise NonFiniteNormError(f"{what}: the clip coefficient is {clip_coef}")
                plan.skip = nonfinite == "skip"
            return plan
        _check_device(lib, clip_coef, like, "clip_coef")
        plan.coef_dev = lib.to_f64(clip_coef)
        if nonfinite == "error":
            value = lib.host_float(plan.coef_dev)  # the documented synchronisation
            if not value >= 0.0:
                raise NonFiniteNormError(f"{what}: the clip coefficient is {value}")
        elif nonfinite == "skip":
            plan.guard_mode, plan.guard = GUARD_COEF, plan.coef_dev
        return plan
    if mode == "none":
        return plan
    c, pcode, p, eps_v = norm_args(max_norm, norm_type, eps)
    kind = "float64" if any(lib.kind(g) == "float64" for g in grads) else "float32"
    if isinstance(total_norm, float):  # known on the host: decided there, as the CPU path
        plan.norm = _full(lib, total_norm, kind, like)
        if not math.isfinite(total_norm):
            if nonfinite == "error":
                raise NonFiniteNormError(nonfinite_step_message(what, total_norm))
            if nonfinite == "skip":
                plan.skip = True
                return plan
        plan.coef_host = clip_coefficient(c, total_norm, eps_v)
        return plan
    if total_norm is None:
        packed = _driver._Packed(lib, grads, what, writing=False)
        kind = packed.norm_kind
        norm, coef = packed.finish(pcode, p, c, eps_v, 1)
    else:
        _check_device(lib, total_norm, like, "total_norm")
        norm, coef = _finish_given(lib, lib.to_f64(total_norm), c, eps_v, kind, like)
    plan.norm, plan.coef_dev = norm, coef
    if nonfinite == "error":
        value = lib.host_float(norm)  # the documented synchronisation
        if not math.isfinite(value):
            raise NonFiniteNormError(nonfinite_step_message(what, value))
    elif nonfinite == "skip":
        plan.guard = norm
        plan.guard_mode = GUARD_NORM_F64 if kind == "float64" else GUARD_NORM_F32
    return plan


# ------------------------------------------------------------- public flows


def adamw_step_gpu(
    lib: Any,
    params: list[Any],
    grads: list[Any],
    exp_avgs: list[Any],
    exp_avg_sqs: list[Any],
    max_exp_avg_sqs: list[Any] | None,
    hp: np.ndarray,
    maximize: bool,
    max_norm: float | None,
    norm_type: Any,
    total_norm: Any,
    clip_coef: Any,
    clip_eps: Any,
    nonfinite: str,
    what: str = "adamw_step_",
) -> Any:
    """Validated inputs -> one fused AdamW step per dtype on the device; the 0-d norm or None."""
    with _driver._on_device(lib, params[0]):
        step = Step(
            lib,
            [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs],
            [True, False, True, True, True],
            what,
        )
        plan = clip_plan(
            lib, grads, max_norm, norm_type, total_norm, clip_coef, clip_eps, nonfinite, what
        )
        if not plan.skip:
            step.launch_adamw(hp, plan, -1.0 if maximize else 1.0, max_exp_avg_sqs is not None)
            lib.touched(params)
        return plan.norm


def sgd_step_gpu(
    lib: Any,
    params: list[Any],
    grads: list[Any],
    buffers: list[Any] | None,
    hp: np.ndarray,
    maximize: bool,
    max_norm: float | None,
    norm_type: Any,
    total_norm: Any,
    clip_coef: Any,
    clip_eps: Any,
    nonfinite: str,
    what: str = "sgd_step_",
) -> Any:
    """Validated inputs -> one fused SGD step per dtype on the device; the 0-d norm or None."""
    with _driver._on_device(lib, params[0]):
        step = Step(lib, [params, grads, buffers], [True, False, True], what)
        plan = clip_plan(
            lib, grads, max_norm, norm_type, total_norm, clip_coef, clip_eps, nonfinite, what
        )
        if not plan.skip:
            step.launch_sgd(hp, plan, -1.0 if maximize else 1.0)
            lib.touched(params)
        return plan.norm
