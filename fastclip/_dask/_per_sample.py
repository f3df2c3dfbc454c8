"""The Dask route's per-sample clipping (``fastclip.clip_per_sample``), as a lazy graph.

Each array's per-sample power sums are a ``reduction`` over its trailing axes
(``(m, s)`` pairs where the NumPy route rescales, as ``fastclip._dask``'s
norms), stacked ``[n_arrays, B]`` and combined over the arrays (flat) or
rooted per array (``per_layer``).  The factors ``min(1, C / (n + eps))`` are
float64 blocks; ``reduce=None`` scales each sample's slice with the CPU scale
kernels (``map_blocks``), ``"sum"``/``"mean"`` accumulate ``f_b g[b]`` in
float64 over the batch axis and round once to the data's dtype.  ``n_clipped``
is a lazy 0-d int64 dask array: nothing is computed by the call.  A dask
``max_norm`` stays lazy too (a list of per-array bounds holding dask scalars
included): its values are checked in the graph
(``fastclip._dask._checks``), raising the NumPy route's ValueError when computed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._formulas import clip_coefficients
from ._blocks import out_dtype, uses_pairs
from ._checks import checked_layer_bounds, checked_scalar
from ._graphs import global_norm_of, per_array_norms
from ._graphs import reduce as partials

__all__ = ["clip_per_sample"]


def _factors(norms: np.ndarray, bounds: np.ndarray, eps: float) -> np.ndarray:
    return np.asarray(clip_coefficients(norms, bounds, eps), np.float64)


def _weighted(block: np.ndarray, f: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):  # inf * 0 is NaN, as on the NumPy route
        return np.asarray(block, np.float64) * f


def _batch_sum(parts: np.ndarray, axis: Any, keepdims: bool, **_: Any) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.sum(parts, axis=axis, keepdims=keepdims)


def _lazy_bounds(value: Any, per_layer: bool, n: int) -> Any:
    """A dask ``max_norm`` (size 1, or with ``per_layer`` 1-d of one bound per array, or
    a list of them holding dask scalars: ``fastclip._api._per_sample`` checked its
    structure) as ``n`` checked float64 bounds."""
    import dask.array as da

    if isinstance(value, (list, tuple)) or (per_layer and value.ndim == 1):
        return checked_layer_bounds("clip_per_sample", value)
    return da.broadcast_to(checked_scalar("clip_per_sample", "max_norm", value), (n,))


def _sample_axes(x: Any) -> tuple[Any, tuple[int, ...]]:
    """``x`` as ``[B, ...]`` with at least one trailing axis, and those axes."""
    x2 = x[:, None] if x.ndim == 1 else x
    return x2, tuple(range(1, x2.ndim))


def clip_per_sample(
    lib: Any,
    items: list[Any],
    batch: int,
    ord_code: int,
    p: float,
    bounds: Any,
    per_layer: bool,
    reduce: str | None,
    eps: float,
) -> tuple[list[Any], Any, Any]:
    import dask.array as da

    from . import _checked, _scaled

    _checked(items, "clip_per_sample")
    # a dask max_norm, or a list of per-array bounds holding dask scalars: checked in the
    # graph; else float64 NumPy bounds, checked by the API
    lazy = isinstance(bounds, (da.Array, list, tuple))
    if lazy:
        bounds = _lazy_bounds(bounds, per_layer, len(items))
    pairs = uses_pairs(items, ord_code)
    shaped = [_sample_axes(x) for x in items]
    parts = [partials(x2, ord_code, p, axes, False, False, pairs) for x2, axes in shaped]
    stacked = da.stack(parts)  # [n_arrays, B]
    if per_layer:
        norms64 = per_array_norms(stacked, ord_code, p, pairs)
        c = da.broadcast_to(da.asarray(bounds[:, None]), norms64.shape).rechunk(norms64.chunks)
        f = da.map_blocks(_factors, norms64, c, eps=eps, dtype=np.float64)
        below = da.any(f < 1.0, axis=0)
    else:
        norms64 = global_norm_of(stacked, ord_code, p, pairs)
        if lazy:  # the bound as blocks laid out as the norms
            c = da.broadcast_to(bounds[0], norms64.shape).rechunk(norms64.chunks)
            f = da.map_blocks(_factors, norms64, c, eps=eps, dtype=np.float64)
        else:
            f = norms64.map_blocks(_factors, bounds=float(bounds[0]), eps=eps, dtype=np.float64)
        below = f < 1.0
    n_clipped = da.sum(below, dtype=np.int64)
    outs = []
    for k, (x, (x2, axes)) in enumerate(zip(items, shaped)):
        fk = f[k] if per_layer else f
        # keepdims [B, 1, ...], in x's batch chunks (the stack may have cut finer ones)
        fk = fk.rechunk((x2.chunks[0],))[(slice(None),) + (None,) * len(axes)]
        if reduce is None:
            y = _scaled(x2, fk, axes)
            outs.append(y[:, 0] if x.ndim == 1 else y)
            continue
        w = da.map_blocks(_weighted, x2, fk, dtype=np.float64)
        s = da.reduction(
            w,
            _batch_sum,
            _batch_sum,
            axis=0,
            dtype=np.float64,
            concatenate=True,
            name="fastclip-per-sample-sum",
        )
        if reduce == "mean" and batch:  # an empty batch's mean is its zero sum
            s = s / batch
        outs.append((s[..., 0] if x.ndim == 1 else s).astype(x.dtype))
    wide = any(out_dtype(x) == np.float64 for x in items)
    return outs, norms64.astype(np.float64 if wide else np.float32), n_clipped
