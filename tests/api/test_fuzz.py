"""Contract fuzzer: the stateless public functions, over dtypes, layouts, flags and arguments.

This file owns the contract of norm, clip_by_norm(_), normalize(_),
clip_by_value(_), clip_by_global_norm(_), scale_ and clip_per_sample on
NumPy; the fused steps, the clippers and fastclip.torch are fuzzed in
``test_fuzz_steps.py`` (shared strategies in ``tests/_fuzz.py``); each
operation's examples on the backend matrix are in its own ``test_<op>.py``.

Each example calls one function on arrays drawn over dtypes (floats, complex,
integers, bool, byte-swapped, long double), shapes (empty included), layouts
(contiguous, transposed, strided, reversed, Fortran, broadcast with stride 0),
the read-only flag and magnitudes (subnormal to 1e300, inf, NaN), with
arguments that may be invalid.  The contract checked:

* the call returns the float64 reference's value (rounded to the result's
  dtype), or raises a ``TypeError`` / ``ValueError`` (never a leaked numba,
  torch or ``OverflowError``);
* out-of-place calls never change a byte of their inputs;
* a refused in-place call changes no byte of any input, and a clipper that
  refuses keeps its state.

The CI profile (conftest.py) keeps it to a few seconds per test; a long run is
``FASTCLIP_HYPOTHESIS_PROFILE=fastclip-fuzz python -m pytest tests/api/test_fuzz*.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import reference as ref
from _fuzz import (
    MAGNITUDE,
    as64,
    assert_matches,
    call,
    snapshot,
    values,
)
from hypothesis import given
from hypothesis import strategies as st

import fastclip
import fastclip.optim

DTYPES = ["<f2", "<f4", "<f8", "<c8", "<c16", "i1", "i4", "i8", "u1", "?", ">f4", ">f8", ">f2"]
if np.dtype(np.longdouble).itemsize > 8:
    DTYPES.append("g")
FLOATS = ["<f4", "<f8", "<f2"]
LAYOUTS = ["c", "t", "s", "r", "f", "b"]
ORDS = [1, 2, math.inf, 3, 0.5, "inf"]


@st.composite
def arrays(draw: Any, dtypes: list[str] = DTYPES, max_dims: int = 3) -> tuple[np.ndarray, Any]:
    """A NumPy array and the array that owns its memory (whose bytes are checked)."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    ndim = draw(st.integers(1, max_dims))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    layout = draw(st.sampled_from(LAYOUTS))
    full = shape
    if layout == "s":
        full = (2 * shape[0], *shape[1:])
    elif layout == "t":
        full = shape[::-1]
    elif layout == "b":
        full = (1, *shape[1:])
    n = math.prod(full)
    v = draw(values(n))
    with np.errstate(all="ignore"):
        if dtype.kind in "biu":
            v = np.nan_to_num(v, nan=0.0, posinf=100.0, neginf=-100.0)
            v = np.clip(np.round(v), -100, 100)
        if dtype.kind == "c":
            v = v + 1j * v[::-1]
        owner = np.asarray(v.reshape(full)).astype(dtype)
    if layout == "f":
        owner = np.asfortranarray(owner)
    x = {
        "c": lambda a: a,
        "f": lambda a: a,
        "t": lambda a: a.T,
        "s": lambda a: a[::2],
        "r": lambda a: a[::-1],
        "b": lambda a: np.broadcast_to(a, shape),
    }[layout](owner)
    if draw(st.booleans()) and draw(st.booleans()):
        owner.flags.writeable = False
        x = x.view()
        x.flags.writeable = False
    return x, owner


def _result_dtype(x: np.ndarray) -> np.dtype:
    return np.dtype(x.dtype.newbyteorder("="))


def _norm_dtype(x: np.ndarray) -> np.dtype:
    return np.dtype(np.float64 if x.dtype.itemsize >= 8 and x.dtype.kind != "c" else np.float32)


@st.composite
def axes_for(draw: Any, ndim: int) -> Any:
    if draw(st.booleans()):
        return None
    axes = draw(st.lists(st.integers(-ndim, ndim - 1), min_size=1, max_size=ndim))
    return tuple(axes) if len(axes) > 1 else axes[0]


_MAX_NORMS = st.sampled_from(
    [0.0, 1e-300, 1e-30, 0.5, 1.0, 7.0, 1e30, math.inf, -1.0, math.nan, 10**400]
)
_EPS = st.sampled_from([1e-6, 0.0, 1e-3, -1.0, math.nan])


@given(xo=arrays(), ord=st.sampled_from(ORDS), data=st.data())
def test_norm_contract(xo: Any, ord: Any, data: Any) -> None:
    x, owner = xo
    axis = data.draw(axes_for(x.ndim))
    before = snapshot([owner])
    got, exc = call(fastclip.norm, x, ord, axis=axis)
    assert snapshot([owner]) == before
    if exc is None:
        want = ref.norm(as64(x), float(ord), axis=_norm_axis(axis, x.ndim))
        wide = (x.dtype.kind == "f" and x.dtype.itemsize >= 8) or x.dtype == np.complex128
        dt = np.dtype(np.float64) if wide else None
        assert_matches(got, want, dt if dt is not None else np.asarray(got).dtype)


def _norm_axis(axis: Any, ndim: int) -> Any:
    if axis is None:
        return None
    axes = (axis,) if isinstance(axis, int) else axis
    return tuple(a % ndim for a in axes)


@given(
    xo=arrays(),
    max_norm=_MAX_NORMS,
    ord=st.sampled_from(ORDS),
    eps=_EPS,
    inplace=st.booleans(),
    normalize=st.booleans(),
    data=st.data(),
)
def test_clip_by_norm_and_normalize_contract(
    xo: Any, max_norm: Any, ord: Any, eps: Any, inplace: bool, normalize: bool, data: Any
) -> None:
    x, owner = xo
    axis = data.draw(axes_for(x.ndim))
    before = snapshot([owner])
    x64 = as64(x)
    if normalize:
        fn = fastclip.normalize_ if inplace else fastclip.normalize
        got, exc = call(fn, x, ord, axis=axis, eps=eps)
    else:
        fn = fastclip.clip_by_norm_ if inplace else fastclip.clip_by_norm
        got, exc = call(fn, x, max_norm, ord, axis=axis, eps=eps)
    if exc is not None or not inplace:
        assert snapshot([owner]) == before, "input bytes changed"
    if exc is not None:
        return
    ax = _norm_axis(axis, x.ndim)
    with np.errstate(all="ignore"):  # the oracle's own overflow to inf is the answer
        if normalize:
            want = ref.normalize(x64, float(ord), axis=ax, eps=float(eps))
        else:
            want = ref.clip_by_norm(x64, float(max_norm), float(ord), axis=ax, eps=float(eps))
    assert_matches(x if inplace else got, want, _result_dtype(x))


_BOUNDS = st.sampled_from([None, -math.inf, math.inf, -1e30, 1e30, -0.5, 0.5, 2.5, -3, 3, 10**30])


def _clip_value_oracle(x64: np.ndarray, dtype: np.dtype, lo: Any, hi: Any) -> np.ndarray:
    if dtype.kind in "biu":
        low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        out = []
        for e in x64.reshape(-1).real:
            e = int(e)
            if lo is not None:
                e = max(e, math.ceil(lo) if math.isfinite(lo) else lo)
            if hi is not None:
                e = min(e, math.floor(hi) if math.isfinite(hi) else hi)
            out.append(min(max(e, low), high))
        return np.array(out, dtype=dtype).reshape(x64.shape)  # exact: no float64 rounding
    return ref.clip_by_value(x64, lo, hi)


@given(xo=arrays(), lo=_BOUNDS, hi=_BOUNDS, inplace=st.booleans())
def test_clip_by_value_contract(xo: Any, lo: Any, hi: Any, inplace: bool) -> None:
    x, owner = xo
    before = snapshot([owner])
    x64 = as64(x)
    fn = fastclip.clip_by_value_ if inplace else fastclip.clip_by_value
    got, exc = call(fn, x, lo, hi)
    if exc is not None or not inplace:
        assert snapshot([owner]) == before, "input bytes changed"
    if exc is not None:
        return
    want = _clip_value_oracle(x64, x.dtype, lo, hi)
    assert_matches(x if inplace else got, want, _result_dtype(x))


@st.composite
def array_lists(draw: Any) -> tuple[list[Any], list[Any]]:
    n = draw(st.integers(1, 3))
    dtypes = draw(st.sampled_from([FLOATS, DTYPES]))
    pairs = [draw(arrays(dtypes)) for _ in range(n)]
    xs, owners = [p[0] for p in pairs], [p[1] for p in pairs]
    if draw(st.integers(0, 6)) == 0:
        xs.append(np.float32(3.0))
        owners.append(np.zeros(0))
    if draw(st.integers(0, 6)) == 0 and owners[0].size > 1 and owners[0].flags.writeable:
        xs.append(owners[0][: owners[0].shape[0] // 2 + 1])  # overlaps the first array
        owners.append(np.zeros(0))
    return xs, owners


@given(
    xo=array_lists(),
    max_norm=_MAX_NORMS,
    ord=st.sampled_from(ORDS),
    eps=_EPS,
    inplace=st.booleans(),
)
def test_clip_by_global_norm_contract(
    xo: Any, max_norm: Any, ord: Any, eps: Any, inplace: bool
) -> None:
    xs, owners = xo
    before = snapshot(owners)
    copies = [as64(x) for x in xs]
    fn = fastclip.clip_by_global_norm_ if inplace else fastclip.clip_by_global_norm
    got, exc = call(fn, xs, max_norm, ord, eps=eps)
    if exc is not None or not inplace:
        assert snapshot(owners) == before, "input bytes changed"
    if exc is not None:
        return
    with np.errstate(all="ignore"):  # the oracle's max_norm / 2e-310 overflows to inf
        want, total = ref.clip_by_global_norm(copies, float(max_norm), float(ord), float(eps))
    outs = xs if inplace else got[0]
    norm_got = got if inplace else got[1]
    # The norm is as precise as its least precise input (float32 blocks for float32).
    wide = all(np.asarray(x).dtype.char in "dD" for x in xs)  # float64 / complex128 only
    assert_matches(norm_got, total, np.asarray(norm_got).dtype, rtol=None if wide else 3e-5)
    for out, w, x in zip(outs, want, xs):  # one coefficient: the norm's precision
        dt = _result_dtype(np.asarray(x))
        assert_matches(out, w, dt, rtol=None if wide or dt.char not in "dD" else 3e-5)


@given(xo=array_lists(), factor=st.sampled_from([0.0, 0.5, 2.0, 1e-30, -1.0, math.nan, 10**400]))
def test_scale_contract(xo: Any, factor: Any) -> None:
    xs, owners = xo
    before = snapshot(owners)
    copies = [as64(x) for x in xs]
    _, exc = call(fastclip.scale_, xs, factor)
    if exc is not None:
        assert snapshot(owners) == before, "input bytes changed"
        return
    for x, c in zip(xs, copies):
        with np.errstate(all="ignore"):
            assert_matches(x, c * float(factor), _result_dtype(np.asarray(x)))


@given(
    n=st.integers(0, 3),
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    max_norm=_MAX_NORMS,
    ord=st.sampled_from([1, 2, math.inf]),
    scale=MAGNITUDE,
    dtype=st.sampled_from(FLOATS),
    data=st.data(),
)
def test_clip_per_sample_contract(
    n: int, shape: list[int], max_norm: Any, ord: Any, scale: float, dtype: str, data: Any
) -> None:
    rng = np.random.default_rng(n)
    with np.errstate(over="ignore"):
        grads = [(rng.standard_normal((n, *shape)) * scale).astype(dtype) for _ in range(2)]
    if data.draw(st.booleans()):
        grads[1].flags.writeable = False
    before = snapshot(grads)
    got, exc = call(fastclip.clip_per_sample, grads, max_norm, ord)
    assert snapshot(grads) == before
    if exc is not None:
        return
    norms, want = _per_sample_oracle([as64(g) for g in grads], float(max_norm), float(ord))
    assert_matches(got.norms, norms, np.asarray(got.norms).dtype)
    for out, w in zip(got.grads, want):
        assert_matches(out, w, np.dtype(np.dtype(dtype).newbyteorder("=")))


def _per_sample_oracle(g64: list[np.ndarray], c: float, ord: float) -> tuple[Any, list[Any]]:
    """Per-sample norms by the overflow-safe ``ref.norm`` (raw power sums of 1e200
    would overflow the oracle itself), factors ``min(1, c / (n + 1e-6))``, sums."""
    b = g64[0].shape[0]
    rows = [np.concatenate([g[i].reshape(-1) for g in g64]) for i in range(b)]
    norms = np.array([ref.norm(r, ord) for r in rows], np.float64)
    with np.errstate(all="ignore"):
        f = np.minimum(1.0, c / (norms + 1e-6))  # norms + 1e-6 > 0
        sums = [(g * f.reshape((b,) + (1,) * (g.ndim - 1))).sum(axis=0) for g in g64]
    return norms, sums
