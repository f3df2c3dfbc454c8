"""Per-axis norms and scaling of one array on the GPU: ``fastclip_rows_pow_sum`` /
``fastclip_cols_pow_sum`` (one power sum per slice), ``fastclip_axis_coefs`` (the
norms and coefficients, on the device) and ``fastclip_axis_scale``.  The
coefficients are the CPU route's two factors per slice (modes 3 and 4,
``_formulas.coefficient_parts``): ``coefs[:n]`` = c, ``coefs[n:]`` = c2, applied
as ``(x * c) * c2``.

Trailing reduction axes of a contiguous array read it as [m, k] rows, leading
ones as [k, m] columns; any other layout is copied in as [kept..., reduced...]
rows and the result copied out.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _config as cfg
from . import _adapters, _modules
from ._modules import ELEMENT_TYPES
from ._tables import elementwise_grid, grid_size, ptr

__all__ = ["axis_layout", "axis_norms", "axis_scale", "rescale_axes"]


def axis_layout(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[str, int, int]:
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


def axis_norms(
    lib: Any,
    x2: Any,
    layout: str,
    a: int,
    b: int,
    ord_code: int,
    p: float,
    max_norm: float,
    eps: float,
    mode: int,
    norm_kind: str,
    like: Any,
) -> tuple[Any, Any]:
    """Per-slice norms and coefficients of a contiguous 2-D view ([m, k] rows or [k, m] cols).

    ``mode``: 0 (norms only), 3 (clip) or 4 (normalise); the coefficients are then
    one float64 array of the n slices' factors c followed by their factors c2."""
    device = lib.device_id(like)
    kind = lib.kind(like)
    n_slices = a if layout == "rows" else b
    pow_sums = lib.empty((max(1, n_slices),), "float64", like)
    if layout == "rows":
        k = _modules.kernel("core", device, "fastclip_rows_pow_sum", ELEMENT_TYPES[kind])
        k(
            (grid_size(a, cfg.GPU_MAX_BLOCKS),),
            (cfg.GPU_BLOCK,),
            (
                ptr(x2, lib),
                np.int64(a),
                np.int64(b),
                np.int32(ord_code),
                np.float64(p),
                ptr(pow_sums, lib),
            ),
        )
    else:
        k = _modules.kernel("core", device, "fastclip_cols_pow_sum", ELEMENT_TYPES[kind])
        grid = elementwise_grid(b, cfg.GPU_BLOCK, cfg.GPU_MAX_BLOCKS)
        k(
            (grid,),
            (cfg.GPU_BLOCK,),
            (
                ptr(x2, lib),
                np.int64(a),
                np.int64(b),
                np.int32(ord_code),
                np.float64(p),
                ptr(pow_sums, lib),
            ),
        )
    norms = lib.empty((n_slices,), norm_kind, like)
    coefs = lib.empty((2 * max(1, n_slices),), "float64", like)
    k = _modules.kernel("core", device, "fastclip_axis_coefs", ELEMENT_TYPES[norm_kind])
    grid = elementwise_grid(n_slices, cfg.GPU_BLOCK, cfg.GPU_MAX_BLOCKS)
    k(
        (grid,),
        (cfg.GPU_BLOCK,),
        (
            ptr(pow_sums, lib),
            np.int64(n_slices),
            np.int32(ord_code),
            np.float64(p),
            np.float64(max_norm),
            np.float64(eps),
            np.int32(mode),
            ptr(norms, lib),
            ptr(coefs, lib),
        ),
    )
    return norms, coefs


def axis_scale(lib: Any, src: Any, dst: Any, n: int, inner: int, outer: int, coefs: Any) -> None:
    k = _modules.kernel(
        "core", lib.device_id(src), "fastclip_axis_scale", ELEMENT_TYPES[lib.kind(src)]
    )
    grid = elementwise_grid(n, cfg.GPU_BLOCK, cfg.GPU_MAX_BLOCKS)
    k(
        (grid,),
        (cfg.GPU_BLOCK,),
        (
            ptr(src, lib),
            ptr(dst, lib),
            np.int64(n),
            np.int64(inner),
            np.int64(outer),
            ptr(coefs, lib),
        ),
    )


def rescale_axes(
    lib: Any,
    x: Any,
    ord_code: int,
    p: float,
    axes: tuple[int, ...],
    max_norm: float,
    eps: float,
    mode: int,
    out: Any,
) -> tuple[Any, Any]:
    """Norms along ``axes`` and, when ``out`` is given, the scaled result written there."""
    shape = tuple(x.shape)
    layout, a, b = axis_layout(shape, axes)
    norm_kind = "float64" if lib.kind(x) == "float64" else "float32"
    with _adapters.on_device(lib, x):
        if layout != "copy" and lib.contiguous(x):
            x2 = lib.reshape(x, (a, b))
            norms, coefs = axis_norms(
                lib, x2, layout, a, b, ord_code, p, max_norm, eps, mode, norm_kind, x
            )
            if out is not None:  # out is x itself or a fresh contiguous array
                dst = lib.reshape(out, (a, b))
                inner, outer = (b, a) if layout == "rows" else (1, b)
                axis_scale(lib, x2, dst, a * b, inner, outer, coefs)
            return out, norms
        # Other layouts: copy in as [kept..., reduced...] rows, copy the result out.
        kept = tuple(i for i in range(len(shape)) if i not in axes)
        perm = kept + axes
        m = math.prod(shape[i] for i in kept)
        k = math.prod(shape[i] for i in axes)
        xt = lib.permute(x, perm)
        x2 = lib.reshape(lib.as_contiguous(xt), (m, k))
        norms, coefs = axis_norms(
            lib, x2, "rows", m, k, ord_code, p, max_norm, eps, mode, norm_kind, x
        )
        if out is not None:
            # Scale into a fresh buffer, never into x2: a permuted view that is
            # already contiguous (size-1 axes, channels_last) comes back from
            # ``as_contiguous`` as the caller's own memory, and an out-of-place
            # call must not write it.
            y2 = lib.empty((m, k), lib.kind(x), x)
            axis_scale(lib, x2, y2, m * k, k, m, coefs)
            lib.write_back(lib.permute(out, perm), lib.reshape(y2, tuple(xt.shape)))
        return out, norms
