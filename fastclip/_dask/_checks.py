"""Checks of the Dask route that read no values: argument shapes and dtypes at the
call, values (a dask ``max_norm``, ``min``/``max`` or ``total_norm``) inside the
graph, and arrays passed twice to an in-place call.

A dask-valued argument cannot be read without computing it, so its value rules
(``max_norm >= 0``, no NaN, ``min <= max``) run in the graph: the argument is
replaced by a checked copy whose blocks raise the NumPy route's ``ValueError``,
with the same message, when (and only when) something that depends on it is
computed.  In place, the array is then rebound to a graph that raises at
compute; no other value is lost (dask arrays are values: any other reference to
the old array keeps it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .._validate import check_max_norm

__all__ = [
    "check_distinct",
    "check_known_length",
    "checked",
    "checked_bounds",
    "checked_layer_bounds",
    "checked_max_norm",
    "checked_scalar",
    "lazy_scalar",
    "scalar_rule",
]


def _raise_if(block: np.ndarray, *others: np.ndarray, bad: Any, message: Any) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        if bad(block, *others):
            raise ValueError(message(block, *others))
    return block


def checked(
    value: Any,
    bad: Callable[..., bool],
    message: Callable[..., str],
    *others: Any,
) -> Any:
    """``value`` with a rule checked block by block at compute time: ``bad(block,
    *other_blocks)`` true raises ``ValueError(message(block, *other_blocks))``.
    ``others`` must be size-1 (they are broadcast to every block)."""
    import dask.array as da

    if not isinstance(value, da.Array):
        return value
    others = tuple(o.reshape(()) if isinstance(o, da.Array) else o for o in others)
    return da.map_blocks(
        _raise_if,
        value,
        *others,
        bad=bad,
        message=message,
        dtype=value.dtype,
        meta=np.empty((0,) * value.ndim, value.dtype),
        token="fastclip-check",
    )


def check_known_length(value: Any, name: str) -> None:
    """ValueError for a dask argument whose shape is unknown (NaN chunk sizes, e.g.
    ``b[b > 0]``): its length cannot be checked without computing it."""
    shape = tuple(value.shape)
    if any(math.isnan(s) for s in shape):
        raise ValueError(
            f"{name} is a dask array of unknown length (NaN chunk sizes, e.g. after "
            f"boolean indexing), so its length cannot be checked without "
            f"computing it; call {name.split('[')[0]}.compute_chunk_sizes() first "
            f"(or persist it)"
        )


def _one_block(value: Any) -> Any:
    """A size-1 dask array in one block: after ``compute_chunk_sizes()`` one of boolean
    indexing can keep empty chunks (``((1, 0),)``), and an empty block has no value to
    check (dask 2026.8's ``reshape(())`` of it fails with an IndexError too)."""
    if math.prod(tuple(value.shape)) == 1 and value.npartitions > 1:
        return value.rechunk(-1)
    return value


def lazy_scalar(value: Any, name: str) -> Any:
    """A size-1 real dask array, as a 0-d float64 dask array; the TypeErrors of
    ``fastclip._validate.scalar_value`` (same messages), read from the shape and
    dtype alone (a ValueError for an unknown shape: ``check_known_length``)."""
    check_known_length(value, name)
    value = _one_block(value)
    shape = tuple(value.shape)
    if math.prod(shape) != 1:
        raise TypeError(f"{name} must be a real number or a 0-d array, got {type(value).__name__}")
    dtype = np.dtype(value.dtype)
    if dtype.kind in "cb":
        raise TypeError(f"{name} must be a real number, got an array of dtype {dtype}")
    if dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real number or a 0-d array, got dtype {dtype}")
    return value.reshape(()).astype(np.float64)


def scalar_rule(fn: str, name: str, rule: str) -> tuple[Callable[..., bool], Callable[..., str]]:
    """The NumPy route's value rule of a scalar argument, as ``checked``'s (bad, message)."""
    if rule == "max_norm":  # fastclip._validate.check_max_norm
        return (
            lambda b: not float(b.reshape(-1)[0]) >= 0.0,
            lambda b: (
                f"fastclip.{fn}: {name} must be >= 0 and not NaN, got {b!r} "
                f"({name}=math.inf means no clipping)"
            ),
        )
    # total_norm: fastclip._api._global._total_norm_value
    return (
        lambda b: float(b.reshape(-1)[0]) < 0,
        lambda b: f"fastclip.{fn}: {name} must be >= 0 (or NaN/inf), got {float(b.reshape(-1)[0])}",
    )


def checked_scalar(fn: str, name: str, value: Any) -> Any:
    """A size-1 dask bound (``max_norm``, ``threshold``, ``clip_norm``) as a 0-d float64
    dask array: ``lazy_scalar``'s TypeErrors at the call, ``check_max_norm``'s rule in
    the graph on the value as given (its dtype and shape in the message, as on NumPy)."""
    check_known_length(value, name)
    value = _one_block(value)
    return lazy_scalar(checked(value, *scalar_rule(fn, name, "max_norm")), name)


def checked_layer_bounds(fn: str, value: Any) -> Any:
    """A 1-d dask ``max_norm`` of one bound per array (``clip_per_sample(...,
    per_layer=True)``) as float64, ``check_max_norm``'s rule checked on each element in
    the graph; the message names the first bad element, ``max_norm[k]``, as on NumPy.

    A list or tuple of bounds (dask scalars, numbers or both) is stacked into one:
    each dask element checked as a scalar bound named ``max_norm[k]`` (its TypeErrors
    now, its value rule in the graph), each number by ``check_max_norm`` now, so
    nothing is computed."""
    import dask.array as da

    if isinstance(value, (list, tuple)):
        # one block, as a 1-d bound: every output depends on every element's check, so
        # one bad bound fails the whole result, as NumPy refuses the whole call
        return da.stack([_layer_bound(fn, k, v) for k, v in enumerate(value)]).rechunk(-1)
    check_known_length(value, "max_norm")
    dtype = np.dtype(value.dtype)
    if dtype.kind in "cb":  # fastclip._validate.scalar_value on element 0, as NumPy
        raise TypeError(f"max_norm[0] must be a real number, got an array of dtype {dtype}")
    if dtype.kind not in "fiu":
        raise TypeError(f"max_norm[0] must be a real number or a 0-d array, got dtype {dtype}")

    def bad_at(b: np.ndarray) -> np.ndarray:
        return ~(np.asarray(b, np.float64) >= 0.0)  # NaN fails >= too

    def message(b: np.ndarray) -> str:
        k = int(np.argmax(bad_at(b)))
        return (
            f"fastclip.{fn}: max_norm[{k}] must be >= 0 and not NaN, got {b[k]!r} "
            f"(max_norm[{k}]=math.inf means no clipping)"
        )

    # one block (a bound per array: a few values), so its index is the element's index
    one = value.rechunk(-1)
    return checked(one, lambda b: bool(bad_at(b).any()), message).astype(np.float64)


def _layer_bound(fn: str, k: int, value: Any) -> Any:
    """Element ``k`` of a list of per-array bounds as a 0-d float64 dask array."""
    import dask.array as da

    name = f"max_norm[{k}]"
    if isinstance(value, da.Array):
        return checked_scalar(fn, name, value)
    return da.asarray(np.float64(check_max_norm(value, name)))


def check_distinct(arrays: list[Any]) -> None:
    """ValueError when one dask array object appears twice in an in-place call.

    In place on dask rebinds each object to its clipped graph: an object passed
    twice would be counted twice in the norm and rebound twice, the NumPy
    route's "scaled twice" (it refuses arrays that share memory).  Two objects
    with one ``.name`` are two references to one value, each rebound on its own,
    as NumPy's ``[x, x.copy()]``: accepted.
    """
    seen: dict[int, int] = {}
    for j, a in enumerate(arrays):
        i = seen.setdefault(id(a), j)
        if i != j:
            raise ValueError(
                f"arrays {i} and {j} of this in-place call are the same dask array; it "
                "would be counted twice and rebound twice. Pass each array once."
            )


def _bounds_code(lo: Any, hi: Any) -> Any:
    """A lazy 0-d int: 1 NaN in min, 2 NaN in max, 4 ``min > max`` somewhere."""
    import dask.array as da

    code = da.asarray(0)
    for bit, b in ((1, lo), (2, hi)):
        if b is not None:
            code = code + bit * da.any(da.isnan(da.asarray(b))).astype(int)
    if lo is not None and hi is not None:
        code = code + 4 * (~da.all(da.asarray(lo) <= da.asarray(hi))).astype(int)
    return code


def checked_bounds(fn: str, lo: Any, hi: Any) -> tuple[Any, Any]:
    """``min``/``max`` (None, numbers or dask arrays) with the NumPy route's value
    rules checked in the graph: ``fastclip._validate.check_bounds``' messages for
    size-1 bounds, ``fastclip._api._bounds``' for arrays."""
    import dask.array as da

    given = [b for b in (lo, hi) if b is not None]
    if not any(isinstance(b, da.Array) for b in given):
        return lo, hi
    code = _bounds_code(lo, hi)
    scalar = all(math.prod(tuple(getattr(b, "shape", ()))) == 1 for b in given)

    def message(block: np.ndarray, flags: np.ndarray, *pair: np.ndarray) -> str:
        c = int(flags)
        if scalar:
            if c & 3:
                return f"fastclip.{fn}: min and max must not be NaN"
            return f"fastclip.{fn}: min must be <= max, got min={pair[0]!r} > max={pair[1]!r}"
        for bit, name in ((1, "min"), (2, "max")):
            if c & bit:
                return f"fastclip.{fn}: {name} must not contain NaN"
        return f"fastclip.{fn}: min must be <= max elementwise"

    pair = (lo, hi) if scalar and len(given) == 2 else ()
    target = hi if hi is not None else lo
    target = da.asarray(target) if not isinstance(target, da.Array) else target
    out = checked(target, lambda b, c, *_: int(c) != 0, message, code, *pair)
    return (lo, out) if hi is not None else (out, hi)


def checked_max_norm(fn: str, value: Any) -> Any:
    """A dask ``max_norm`` with ``check_max_norm``'s rule (size 1) or the array rules
    of ``fastclip._api._bounds`` (no NaN, ``>= 0`` everywhere), checked in the graph."""
    import dask.array as da

    if math.prod(tuple(value.shape)) == 1:
        bad, message = scalar_rule(fn, "max_norm", "max_norm")
        return checked(_one_block(value), bad, message)
    code = da.any(da.isnan(value)).astype(int) + 2 * da.any(value < 0).astype(int)
    return checked(
        value,
        lambda b, c: int(c) != 0,
        lambda b, c: (
            f"fastclip.{fn}: max_norm must not contain NaN"
            if int(c) & 1
            else f"fastclip.{fn}: max_norm must be >= 0 everywhere"
        ),
        code,
    )
