"""GPU route of ``clip_per_sample``: fused per-sample clipping (DP-SGD) on CuPy arrays
and CUDA tensors.

Kernels: ``per_sample_kernels.cu``, compiled appended to ``kernels.cu`` (whose
element access and power-sum reduction it reuses) by one ``cupy.RawModule``
per device.  Flow for K arrays ``g_k`` of shape ``[B, D_k]`` (see the .cu
header): K pass-1 launches (chunk power sums), one factors launch (norms,
factors and the clipped count, on the device), K pass-2 launches (weighted
column sums, plus a combine launch for an array whose batch is split into row
groups) or K row-scale launches for ``reduce=None``.  The clipped per-sample
copies are never materialised for ``reduce="sum"``/``"mean"``.

Where a float64 power sum can over/underflow (the CPU route's
``_needs_rescale``: L2 with a float64 array, any p other than 1, 2 and inf),
the factors launch becomes three stages around 2K extra pass-1 launches that
read only the rows of samples outside the exact range, rescaled by their max
as the CPU route's ``robust_norm`` does (see the .cu header); decided on the
device, so still one synchronisation.

Synchronisation: exactly one device-to-host read, at the very end, after
every launch is queued: ``n_clipped`` (a Python int in the result) is counted
on the device and read back then.  Everything else (norms, outputs) stays on
the device.  (So a call cannot be captured in a CUDA graph: the read is illegal
during capture.)  Kernels run on torch's current stream for CUDA tensors and on
CuPy's current stream for CuPy arrays; scratch memory comes from the same
library's stream-ordered allocator.

Pure host-side planning (:func:`plan_rows`, :func:`plan_weighted_sum`) is
NumPy-only; CuPy is imported only when a module is built (``_modules``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _config as cfg
from .._formulas import SAFE_HI, SAFE_LO, needs_rescale
from . import _adapters, _modules
from ._modules import ELEMENT_TYPES
from ._tables import ITEMSIZE, device_table, elementwise_grid, grid_size, ptr, u64

__all__ = ["clip_per_sample_gpu", "plan_rows", "plan_weighted_sum"]

# ------------------------------------------------------------------ tunables

#: Elements of one row per pass-1 block (one (row, chunk) work item per block).
POW_CHUNK: int = 32_768
#: Threads per block of the pass-2 kernels.
PASS2_BLOCK: int = 256
#: Pass 2 aims at about this many blocks (8 per SM on a 132-SM H100) and splits
#: the batch into row groups when the columns alone give fewer.
TARGET_BLOCKS: int = 1_024
#: Smallest row group of a split batch: each group writes and the combine reads one
#: float64 row, so with 16 rows that traffic is at most 1/4 (float32) of the data read.
#: Not yet tuned on a GPU.
MIN_SPLIT_ROWS: int = 16
#: grid.y limit of CUDA.
MAX_GRID_Y: int = 65_535

# ------------------------------------------------------------------ planning


def plan_rows(cols: list[int], chunk: int) -> tuple[list[int], list[int], int]:
    """Pass-1 chunks per row of each array, each array's first chunk column, chunks per row.

    An array of ``D`` columns has ``ceil(D / chunk)`` chunks per row (none for
    ``D == 0``).  The partials of all arrays share one float64 buffer of
    ``B * total`` entries; array k's block is ``[B, n_chunks[k]]`` row-major and
    starts at entry ``B * offsets[k]``.
    """
    n_chunks = [(d + chunk - 1) // chunk for d in cols]
    offsets = [0] * len(cols)
    total = 0
    for k, n in enumerate(n_chunks):
        offsets[k] = total
        total += n
    return n_chunks, offsets, total


def plan_weighted_sum(
    rows: int, cols: int, vector: int, block: int, target_blocks: int, min_rows: int
) -> tuple[int, int, int, int]:
    """Pass-2 launch shape: (grid_x, grid_y, rows_per_split, n_splits).

    ``vector`` is the number of columns one thread owns (16 bytes' worth when
    the rows are 16-byte aligned, else 1).  The batch is split into row groups
    only when the columns alone give fewer than ``target_blocks`` blocks and
    every group keeps at least ``min_rows`` rows.
    """
    units = (cols + vector - 1) // vector
    grid_x = grid_size((units + block - 1) // block, cfg.GPU_MAX_BLOCKS)
    want = max(1, target_blocks // grid_x)
    splits = max(1, min(want, rows // max(1, min_rows)))
    rows_per_split = (rows + splits - 1) // splits
    n_splits = (rows + rows_per_split - 1) // rows_per_split
    return grid_x, min(n_splits, MAX_GRID_Y), rows_per_split, n_splits


def _vector(lib: Any, x: Any, kind: str, cols: int) -> int:
    """Columns per pass-2 thread: as the kernel decides (aligned rows: one 16-byte vector)."""
    v = 16 // ITEMSIZE[kind]
    return v if lib.ptr(x) % 16 == 0 and cols % v == 0 else 1


# -------------------------------------------------------------------- driver


def _check_items(lib: Any, items: list[Any]) -> tuple[int, list[str]]:
    """Device and storage kind of every array; TypeError before any work."""
    device = lib.device_id(items[0])
    kinds = []
    for i, x in enumerate(items):
        kind = lib.kind(x)
        if kind is None:
            raise TypeError(
                "clip_per_sample on the GPU needs float16, bfloat16, float32 or float64 "
                f"arrays; grads[{i}] has dtype {x.dtype}"
            )
        if lib.device_id(x) != device:
            raise TypeError(
                "all arrays in one GPU call must be on one device, got devices "
                f"{device} and {lib.device_id(x)}"
            )
        kinds.append(kind)
    return device, kinds


def _empty_batch(
    lib: Any, items: list[Any], kinds: list[str], per_layer: bool, reduce: str | None
) -> tuple[list[Any], Any, int]:
    """An empty batch (Poisson sampling can draw one): zero sums (the mean of no
    samples is its zero sum, as ``clip_per_sample`` documents), empty norms, no
    clipped sample.  No kernel is launched (a grid of 0 blocks is a launch error)
    and nothing is read back."""
    like = items[0]
    with _adapters.on_device(lib, like):
        norm_kind = "float64" if "float64" in kinds else "float32"
        norms = lib.empty((len(items), 0) if per_layer else (0,), norm_kind, like)
        outs = []
        for x, kind in zip(items, kinds):
            shape = tuple(x.shape) if reduce is None else tuple(x.shape)[1:]
            out = lib.empty(shape, kind, like)
            if reduce is not None and math.prod(shape):
                out[...] = 0
            outs.append(out)
    return outs, norms, 0


def clip_per_sample_gpu(
    lib: Any,
    items: list[Any],
    batch: int,
    ord_code: int,
    p: float,
    bounds: np.ndarray,
    per_layer: bool,
    reduce: str | None,
    eps: float,
) -> tuple[list[Any], Any, int]:
    """(outputs, norms, n_clipped) as ``_per_sample._cpu_path``, on the arrays' device.

    ``items`` are validated ``[B, ...]`` real floating arrays of one library
    (``lib``: an adapter of ``_adapters``); ``bounds`` one float64 bound per array.
    Reads ``n_clipped`` back at the end: the one host synchronisation.
    """
    device, kinds = _check_items(lib, items)
    if batch == 0:
        return _empty_batch(lib, items, kinds, per_layer, reduce)
    like = items[0]
    null = u64(0)
    with _adapters.on_device(lib, like):
        views = [x if lib.contiguous(x) else lib.as_contiguous(x) for x in items]
        cols = [math.prod(tuple(x.shape)[1:]) for x in items]

        # pass 1: per-(row, chunk) power sums of every array
        n_chunks, offsets, per_row = plan_rows(cols, POW_CHUNK)
        partials = lib.empty((max(1, batch * per_row),), "float64", like)
        base = lib.ptr(partials)
        for k, (v, d) in enumerate(zip(views, cols)):
            if d == 0:
                continue
            items_k = batch * n_chunks[k]
            kern = _modules.kernel(
                "per_sample", device, "fastclip_ps_pow_partials", ELEMENT_TYPES[kinds[k]]
            )
            kern(
                (grid_size(items_k, cfg.GPU_MAX_BLOCKS),),
                (cfg.GPU_BLOCK,),
                (
                    ptr(v, lib),
                    np.int64(batch),
                    np.int64(d),
                    np.int64(POW_CHUNK),
                    np.int64(n_chunks[k]),
                    np.int32(ord_code),
                    np.float64(p),
                    np.int32(0),
                    null,
                    np.int64(0),
                    u64(base + 8 * batch * offsets[k]),
                ),
            )

        # norms, factors and the clipped count, on the device
        n = len(items)
        table = np.empty(3 * n, np.int64)
        table[:n] = np.asarray(offsets, np.int64) * batch
        table[n : 2 * n] = n_chunks
        table[2 * n :] = np.ascontiguousarray(bounds, np.float64).view(np.int64)
        dev_table = device_table(lib, like, table)
        norm_kind = "float64" if "float64" in kinds else "float32"
        norms = lib.empty((n, batch) if per_layer else (batch,), norm_kind, like)
        factors = lib.empty((n * batch if per_layer else batch,), "float64", like)
        count = lib.empty((), "float64", like)
        factors_kern = _modules.kernel(
            "per_sample", device, "fastclip_ps_factors", ELEMENT_TYPES[norm_kind]
        )

        def launch_factors(stage: int, maxp: Any, scaledp: Any, scale: Any) -> None:
            factors_kern(
                (1,),
                (cfg.GPU_FINISH_BLOCK,),
                (
                    ptr(partials, lib),
                    ptr(dev_table, lib),
                    np.int64(n),
                    np.int64(batch),
                    np.int32(ord_code),
                    np.float64(p),
                    np.float64(eps),
                    np.int32(1 if per_layer else 0),
                    np.int32(stage),
                    np.float64(SAFE_LO),
                    np.float64(SAFE_HI),
                    null if maxp is None else ptr(maxp, lib),
                    null if scaledp is None else ptr(scaledp, lib),
                    null if scale is None else ptr(scale, lib),
                    ptr(norms, lib),
                    ptr(factors, lib),
                    ptr(count, lib),
                ),
            )

        if needs_rescale(ord_code, norm_kind == "float64"):
            scale = lib.empty((n * batch if per_layer else batch,), "float64", like)
            maxp = lib.empty((max(1, batch * per_row),), "float64", like)
            scaledp = lib.empty((max(1, batch * per_row),), "float64", like)
            launch_factors(1, None, None, scale)  # mark samples outside the exact range
            for mode, buf in ((1, maxp), (2, scaledp)):
                for k, (v, d) in enumerate(zip(views, cols)):
                    if d == 0:
                        continue
                    items_k = batch * n_chunks[k]
                    kern = _modules.kernel(
                        "per_sample", device, "fastclip_ps_pow_partials", ELEMENT_TYPES[kinds[k]]
                    )
                    kern(
                        (grid_size(items_k, cfg.GPU_MAX_BLOCKS),),
                        (cfg.GPU_BLOCK,),
                        (
                            ptr(v, lib),
                            np.int64(batch),
                            np.int64(d),
                            np.int64(POW_CHUNK),
                            np.int64(n_chunks[k]),
                            np.int32(ord_code),
                            np.float64(p),
                            np.int32(mode),
                            ptr(scale, lib),
                            np.int64(k * batch if per_layer else 0),
                            u64(lib.ptr(buf) + 8 * batch * offsets[k]),
                        ),
                    )
                if mode == 1:
                    launch_factors(2, maxp, None, scale)  # scale[s] = the sample's max
            launch_factors(0, maxp, scaledp, scale)
        else:
            launch_factors(0, None, None, None)

        # pass 2
        fbase = lib.ptr(factors)
        scale = 1.0 / batch if reduce == "mean" else 1.0
        outs = []
        if reduce is None:
            for k, (x, v, d) in enumerate(zip(items, views, cols)):
                out = lib.empty(tuple(x.shape), kinds[k], like)
                outs.append(out)
                if d == 0:
                    continue
                f_k = u64(fbase + 8 * batch * k if per_layer else fbase)
                vec = _vector(lib, v, kinds[k], d)
                units = (d + vec - 1) // vec
                grid = (
                    grid_size((units + PASS2_BLOCK - 1) // PASS2_BLOCK, cfg.GPU_MAX_BLOCKS),
                    min(batch, MAX_GRID_Y),
                )
                kern = _modules.kernel(
                    "per_sample", device, "fastclip_ps_scale_rows", ELEMENT_TYPES[kinds[k]]
                )
                kern(
                    grid,
                    (PASS2_BLOCK,),
                    (ptr(v, lib), np.int64(batch), np.int64(d), f_k, ptr(out, lib)),
                )
        else:
            plans = [
                plan_weighted_sum(
                    batch,
                    d,
                    _vector(lib, v, kinds[k], d),
                    PASS2_BLOCK,
                    TARGET_BLOCKS,
                    MIN_SPLIT_ROWS,
                )
                for k, (v, d) in enumerate(zip(views, cols))
            ]
            # one float64 scratch for every split array: they run one after another on the stream
            scratch_size = max((pl[3] * d for pl, d in zip(plans, cols) if pl[3] > 1), default=0)
            scratch = lib.empty((max(1, scratch_size),), "float64", like)
            for k, (x, v, d) in enumerate(zip(items, views, cols)):
                out = lib.empty(tuple(x.shape)[1:], kinds[k], like)
                outs.append(out)
                if d == 0:
                    continue
                grid_x, grid_y, rows_per_split, n_splits = plans[k]
                f_k = u64(fbase + 8 * batch * k if per_layer else fbase)
                targ = ELEMENT_TYPES[kinds[k]]
                kern = _modules.kernel("per_sample", device, "fastclip_ps_weighted_sum", targ)
                kern(
                    (grid_x, grid_y),
                    (PASS2_BLOCK,),
                    (
                        ptr(v, lib),
                        np.int64(batch),
                        np.int64(d),
                        f_k,
                        np.int64(rows_per_split),
                        np.int64(n_splits),
                        np.float64(scale),
                        ptr(out, lib),
                        ptr(scratch, lib),
                    ),
                )
                if n_splits > 1:
                    kern = _modules.kernel("per_sample", device, "fastclip_ps_combine", targ)
                    kern(
                        (elementwise_grid(d, PASS2_BLOCK, cfg.GPU_MAX_BLOCKS),),
                        (PASS2_BLOCK,),
                        (
                            ptr(scratch, lib),
                            np.int64(n_splits),
                            np.int64(d),
                            np.float64(scale),
                            ptr(out, lib),
                        ),
                    )
        # the one synchronisation: every launch above is already queued
        n_clipped = int(lib.host_float(count))
    return outs, norms, n_clipped
