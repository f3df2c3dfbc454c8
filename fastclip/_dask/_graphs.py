"""The Dask route's lazy graphs: norms as ``dask.array.reduction`` (plain power
sums, or ``(m, s)`` pairs where the NumPy route rescales), and the global norm
of a list with, optionally, each array's norm from the same reductions."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._blocks import (
    PAIR,
    block_pairs,
    block_pow_sums,
    combine_root,
    combine_root_pairs,
    pairs_norm,
    rooted_sums,
    uses_pairs,
)

__all__ = [
    "all_axes",
    "global_norm64",
    "global_norm_of",
    "partial",
    "per_array_norms",
    "reduce",
    "rooted",
]


def reduce(
    x: Any,
    ord_code: int,
    p: float,
    axes: tuple[int, ...],
    keepdims: bool,
    root: bool,
    pairs: bool | None = None,
) -> Any:
    """Lazy float64 norms (``root``) or partial power sums of ``x`` over ``axes``.

    With ``pairs`` (default: where the NumPy route rescales) partials are
    ``(m, s)`` pairs; norms are float64 either way.
    """
    import dask.array as da

    pairs = uses_pairs([x], ord_code) if pairs is None else pairs
    out_ndim = x.ndim if keepdims else x.ndim - len(axes)
    if not pairs:
        return da.reduction(
            x,
            partial(block_pow_sums, ord_code=ord_code, p=p),
            partial(combine_root, ord_code=ord_code, p=p, root=root),
            combine=partial(combine_root, ord_code=ord_code, p=p, root=False),
            axis=axes,
            keepdims=keepdims,
            dtype=np.float64,
            meta=np.empty((0,) * out_ndim, np.float64),
            concatenate=True,
            name="fastclip-norm" if root else "fastclip-pow-sum",
        )
    # dask gives every stage of a reduction one dtype: reduce the pairs, then root them
    partials = da.reduction(
        x,
        partial(block_pairs, ord_code=ord_code, p=p),
        partial(combine_root_pairs, ord_code=ord_code, p=p, root=False),
        combine=partial(combine_root_pairs, ord_code=ord_code, p=p, root=False),
        axis=axes,
        keepdims=keepdims,
        dtype=PAIR,
        meta=np.empty((0,) * out_ndim, PAIR),
        concatenate=True,
        name="fastclip-pow-sum-pairs",
    )
    return rooted(partials, ord_code, p) if root else partials


def rooted(pairs: Any, ord_code: int, p: float) -> Any:
    """Lazy float64 norms of lazy ``(m, s)`` pairs."""
    return pairs.map_blocks(
        pairs_norm,
        ord_code=ord_code,
        p=p,
        dtype=np.float64,
        meta=np.empty((0,) * pairs.ndim, np.float64),
        token="fastclip-norm-pairs",
    )


def partial(func: Any, **kwargs: Any) -> Any:
    import functools

    return functools.partial(func, **kwargs)


def all_axes(x: Any, axes: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(range(x.ndim)) if axes is None else axes


def per_array_norms(stacked: Any, ord_code: int, p: float, pairs: bool) -> Any:
    """Lazy float64 norms of each array from its partials (``stacked``: 1-D, or
    ``[n_arrays, B]`` per sample): the graph's own reductions, rooted; no second
    read of the data."""
    if pairs:
        return rooted(stacked, ord_code, p)
    return stacked.map_blocks(
        partial(rooted_sums, ord_code=ord_code, p=p),
        dtype=np.float64,
        meta=np.empty((0,) * stacked.ndim, np.float64),
        token="fastclip-per-array-norms",
    )


def global_norm64(arrays: list[Any], ord_code: int, p: float, per_array: bool = False) -> Any:
    """The lazy float64 global norm; with ``per_array``, ``(norm, per-array norms)``."""
    import dask.array as da

    pairs = uses_pairs(arrays, ord_code)
    parts = [reduce(a, ord_code, p, all_axes(a, None), False, False, pairs) for a in arrays]
    stacked = da.stack(parts) if len(parts) > 1 else parts[0][None]
    if per_array:
        return global_norm_of(stacked, ord_code, p, pairs), per_array_norms(
            stacked, ord_code, p, pairs
        )
    return global_norm_of(stacked, ord_code, p, pairs)


def global_norm_of(stacked: Any, ord_code: int, p: float, pairs: bool) -> Any:
    """Lazy float64 norms of the partials ``stacked`` combined along axis 0 (the
    global norm of 1-D partials; per-sample norms of ``[n_arrays, B]`` ones)."""
    import dask.array as da

    meta_ndim = stacked.ndim - 1

    if pairs:
        total = da.reduction(
            stacked,
            partial(combine_root_pairs, ord_code=ord_code, p=p, root=False),
            partial(combine_root_pairs, ord_code=ord_code, p=p, root=False),
            combine=partial(combine_root_pairs, ord_code=ord_code, p=p, root=False),
            axis=(0,),
            keepdims=False,
            dtype=PAIR,
            meta=np.empty((0,) * meta_ndim, PAIR),
            concatenate=True,
            name="fastclip-global-pairs",
        )
        return rooted(total, ord_code, p)
    return da.reduction(
        stacked,
        partial(combine_root, ord_code=ord_code, p=p, root=False),
        partial(combine_root, ord_code=ord_code, p=p, root=True),
        combine=partial(combine_root, ord_code=ord_code, p=p, root=False),
        axis=(0,),
        keepdims=False,
        dtype=np.float64,
        meta=np.empty((0,) * meta_ndim, np.float64),
        concatenate=True,
        name="fastclip-global-norm",
    )
