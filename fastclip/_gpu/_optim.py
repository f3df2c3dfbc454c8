"""GPU driver of the fused clip-and-step optimizers (AdamW, SGD): ``optim_kernels.cu``.

Flow of one step (all on the caller's stream, the host never waits):

1. the parallel lists (params, grads, state) are validated and grouped by
   dtype; each group becomes one int64 device table
   ``[ptrs of every list | sizes | chunk_tensor | chunk_start]`` (uploaded
   once and cached while the addresses stay the same, ``_tables.device_table``);
2. the clip coefficient comes from the core's global-norm path
   (``_optim_plan.clip_plan``, through ``_tables.Packed.finish``:
   ``fastclip_partial_pow_sum`` + ``fastclip_finish``), which leaves the norm
   and ``min(1, max_norm / (norm + eps))`` in device memory; with a given
   device ``total_norm`` only the finish kernel runs;
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

Imports no CuPy at module level (the kernels' source and names are in
``_modules``, used by compile checks on machines without a GPU), and the host
side is tested on the CPU with NumPy emulations of the kernels
(``tests/gpu/emulated/test_gpu_optim_emulated.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _config as cfg
from .._memory import overlapping_extents
from . import _adapters, _modules
from ._modules import ELEMENT_TYPES
from ._optim_plan import GpuClip, clip_plan
from ._tables import ITEMSIZE, Group, device_table, grid_size, ptr_or_null

__all__ = ["LISTS", "Step", "adamw_step_gpu", "sgd_step_gpu"]

#: Number of pointer lists per kernel's table (params first).
LISTS = {"fastclip_adamw": 5, "fastclip_sgd": 3}


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
                        ends.append(start + lib.numel(a) * ITEMSIZE[kinds[i]])
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
            self.groups.append(Group(lib, kind, ptrs, sizes, self.like, index))

    def _rows(self, g: Group, hparams: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(device hparams matrix or None, the scalar row) for group ``g``."""
        assert g.index is not None  # a step's groups know their positions in the lists
        rows = hparams if len(g.index) == self.n else hparams[g.index]
        rows = np.ascontiguousarray(rows, np.float64)
        if rows.shape[0] == 1 or bool(np.all(rows == rows[0])):
            return None, rows[0]
        return device_table(self.lib, self.like, rows.reshape(-1)), rows[0]

    def _launch(
        self, name: str, g: Group, clip: GpuClip, sign: float, tail: tuple[Any, ...]
    ) -> None:
        k = _modules.kernel("optim", self.device, name, ELEMENT_TYPES[g.kind])
        grid = grid_size(g.n_chunks, cfg.GPU_MAX_BLOCKS)
        args = (
            g.ptrs,
            np.int64(g.n),
            g.sizes,
            g.chunk_tensor,
            g.chunk_start,
            np.int64(g.n_chunks),
            np.int64(cfg.GPU_CHUNK),
            ptr_or_null(self.lib, clip.coef_dev),
            np.float64(sign * clip.coef_host),
            np.int32(clip.guard_mode),
            ptr_or_null(self.lib, clip.guard),
            *tail,
        )
        k((grid,), (cfg.GPU_BLOCK,), args)

    def launch_adamw(self, hparams: np.ndarray, clip: GpuClip, sign: float, amsgrad: bool) -> None:
        """One ``fastclip_adamw`` launch per dtype (``hparams``: rows of _optim_kernels.A_*)."""
        for g in self.groups:
            if not g.n_chunks:
                continue
            dev, row = self._rows(g, hparams)
            tail = (
                ptr_or_null(self.lib, dev),
                *(np.float64(x) for x in row[:7]),
                np.int32(1 if amsgrad else 0),
            )
            self._launch("fastclip_adamw", g, clip, sign, tail)
        self._done()

    def launch_sgd(self, hparams: np.ndarray, clip: GpuClip, sign: float) -> None:
        """One ``fastclip_sgd`` launch per dtype (``hparams``: rows of _optim_kernels.S_*)."""
        for g in self.groups:
            if not g.n_chunks:
                continue
            dev, row = self._rows(g, hparams)
            tail = (
                ptr_or_null(self.lib, dev),
                *(np.float64(x) for x in row[:4]),
                np.int32(int(row[4])),
                np.int32(1 if row[5] != 0.0 else 0),
            )
            self._launch("fastclip_sgd", g, clip, sign, tail)
        self._done()

    def _done(self) -> None:
        for view, copy in self.copies:
            self.lib.write_back(view, copy)


def adamw_step_gpu(
    lib: Any,
    params: list[Any],
    grads: list[Any],
    exp_avgs: list[Any],
    exp_avg_sqs: list[Any],
    max_exp_avg_sqs: list[Any] | None,
    hparams: np.ndarray,
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
    with _adapters.on_device(lib, params[0]):
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
            step.launch_adamw(hparams, plan, -1.0 if maximize else 1.0, max_exp_avg_sqs is not None)
            lib.touched(params)
        return plan.norm


def sgd_step_gpu(
    lib: Any,
    params: list[Any],
    grads: list[Any],
    buffers: list[Any] | None,
    hparams: np.ndarray,
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
    with _adapters.on_device(lib, params[0]):
        step = Step(lib, [params, grads, buffers], [True, False, True], what)
        plan = clip_plan(
            lib, grads, max_norm, norm_type, total_norm, clip_coef, clip_eps, nonfinite, what
        )
        if not plan.skip:
            step.launch_sgd(hparams, plan, -1.0 if maximize else 1.0)
            lib.touched(params)
        return plan.norm
