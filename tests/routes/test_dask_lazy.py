"""The Dask route builds graphs and computes nothing during a call, for every public
function, dask-valued arguments (bounds, ``max_norm``, ``total_norm``, ``factor``)
and ``clip_per_sample`` included; the values then match the NumPy route and the
float64 oracles of tests/reference.py on several and uneven chunkings.  Value
rules on dask arguments raise at compute time with the NumPy route's messages;
shape and dtype rules, and an array object passed twice to an in-place call,
raise at the call with the NumPy route's error types.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

da = pytest.importorskip(
    "dask.array", reason="dask is not installed (pip install 'dask[array]', the 'dask' extra)"
)
import dask  # noqa: E402
import reference as ref  # noqa: E402
from _backends import ORDS, assert_close, sample  # noqa: E402

import fastclip  # noqa: E402

CHUNKS = {"uneven": ((5, 1, 7), (3, 9, 5)), "rows": ((1,) * 13, (17,)), "several": (4, 6)}
X = sample((13, 17), 3)
X[2] *= 0.01  # rows below and above the bounds
LO, HI = -0.3 - 0.1 * np.abs(sample((17,), 4)), 0.2 + 0.1 * np.abs(sample((17,), 5))


class Recorder:
    """A dask scheduler that records every call (and runs nothing while armed)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, dsk, keys, **kwargs):
        self.calls += 1
        raise AssertionError("a dask graph was computed during the call")


def _d(x: np.ndarray, chunks) -> da.Array:
    return da.from_array(x, chunks=chunks)


def _leaves(result):
    if isinstance(result, (list, tuple)):
        return [leaf for item in result for leaf in _leaves(item)]
    return [result]


def _same(got, want, dtype="float64") -> None:
    got_leaves, want_leaves = _leaves(got), _leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        if isinstance(w, (int, np.integer)):
            assert int(g) == int(w)
            continue
        assert_close(np.asarray(g), np.asarray(w), dtype, atol=1e-12)


# (name, call(lib, arrays...)): ``lib`` is ``da`` with dask inputs, ``np`` for the
# NumPy route; ``a`` and ``b`` are the (13, 17) data and its first 3 rows.
CALLS = {
    "norm": lambda lib, a, b: fastclip.norm(a, 3),
    "norm_axis": lambda lib, a, b: fastclip.norm(a, axis=1, keepdims=True),
    "global_norm": lambda lib, a, b: fastclip.global_norm([a, b], math.inf),
    "global_norm_per": lambda lib, a, b: fastclip.global_norm([a, b], per_array=True),
    "clip_by_norm": lambda lib, a, b: fastclip.clip_by_norm(a, 1.0),
    "clip_by_norm_axis": lambda lib, a, b: fastclip.clip_by_norm(a, 0.5, 1, axis=0),
    "clip_by_norm_0d_bound": lambda lib, a, b: fastclip.clip_by_norm(a, lib.asarray(2.0)),
    "clip_by_norm_row_bounds": lambda lib, a, b: fastclip.clip_by_norm(
        a, lib.asarray(np.linspace(0.1, 2.0, 13)[:, None]), axis=1
    ),
    "normalize": lambda lib, a, b: fastclip.normalize(a, 1, axis=1),
    "clip_by_value": lambda lib, a, b: fastclip.clip_by_value(a, -0.1, 0.2),
    "clip_by_value_list": lambda lib, a, b: fastclip.clip_by_value([a, b], -0.1, 0.2),
    "clip_by_value_0d_bounds": lambda lib, a, b: fastclip.clip_by_value(
        a, lib.asarray(-0.1), lib.asarray(0.2)
    ),
    "clip_by_value_array_bounds": lambda lib, a, b: fastclip.clip_by_value(
        a, lib.asarray(LO), lib.asarray(HI)
    ),
    "clip_by_value_max_only": lambda lib, a, b: fastclip.clip_by_value(a, None, lib.asarray(HI)),
    "clip_by_global_norm": lambda lib, a, b: fastclip.clip_by_global_norm([a, b], 1.0),
    "clip_by_global_norm_per": lambda lib, a, b: fastclip.clip_by_global_norm(
        [a, b], 1.0, 3, per_array=True
    ),
    "clip_by_global_norm_total": lambda lib, a, b: fastclip.clip_by_global_norm(
        [a, b], 1.0, total_norm=lib.asarray(4.0)
    ),
    "clip_by_global_norm_0d_bound": lambda lib, a, b: fastclip.clip_by_global_norm(
        [a, b], lib.asarray(1.5)
    ),
    "clip_coefficient": lambda lib, a, b: fastclip.clip_coefficient(fastclip.norm(a), 1.0),
    "clip_by_block_rms": lambda lib, a, b: fastclip.clip_by_block_rms([a, b], 0.2),
    "clip_by_average_norm": lambda lib, a, b: fastclip.clip_by_average_norm(a, 0.01),
    "clip_per_sample": lambda lib, a, b: fastclip.clip_per_sample(a, 1.0),
    "clip_per_sample_list": lambda lib, a, b: fastclip.clip_per_sample([a, a[:, :4]], 1.0, 3),
    "clip_per_sample_mean": lambda lib, a, b: fastclip.clip_per_sample(
        [a, a[:, 0]], 1.0, math.inf, reduce="mean"
    ),
    "clip_per_sample_none": lambda lib, a, b: fastclip.clip_per_sample(a, 1.0, reduce=None),
    "clip_per_sample_layers": lambda lib, a, b: fastclip.clip_per_sample(
        [a, a[:, 3:]], [1.0, 0.5], per_layer=True, reduce=None
    ),
    # dask bounds of the peers' clips and of clip_per_sample (0-d, size-1, per layer)
    "clip_by_block_rms_0d_bound": lambda lib, a, b: fastclip.clip_by_block_rms(
        [a, b], lib.asarray(0.2)
    ),
    "clip_by_block_rms_f32_bound": lambda lib, a, b: fastclip.clip_by_block_rms(
        a, lib.asarray(np.float32([0.1]))
    ),
    "clip_by_average_norm_0d_bound": lambda lib, a, b: fastclip.clip_by_average_norm(
        a, lib.asarray(0.01)
    ),
    "clip_by_average_norm_int_bound": lambda lib, a, b: fastclip.clip_by_average_norm(
        b, lib.asarray(1)
    ),
    "clip_per_sample_0d_bound": lambda lib, a, b: fastclip.clip_per_sample(
        [a, a[:, 0]], lib.asarray(1.0), 3
    ),
    "clip_per_sample_0d_bound_layers": lambda lib, a, b: fastclip.clip_per_sample(
        [a, a[:, 3:]], lib.asarray([[0.5]]), per_layer=True, reduce="mean"
    ),
    "clip_per_sample_layer_bounds": lambda lib, a, b: fastclip.clip_per_sample(
        [a, a[:, 3:], a[:, 0]], lib.asarray([1.0, 0.5, 0.2]), per_layer=True, reduce=None
    ),
    "clip_per_sample_layer_int_bounds": lambda lib, a, b: fastclip.clip_per_sample(
        [a, a[:, 3:]], lib.asarray([1, 0]), math.inf, per_layer=True
    ),
}


def _in_place(fn):
    """An in-place call returning (its result, the arrays it modified)."""

    def call(lib, a, b):
        a = a.copy()  # NumPy: fresh memory; dask: a fresh object to rebind
        b = b.copy()
        return fn(lib, a, b), a, b

    return call


IN_PLACE = {
    "clip_by_norm_": _in_place(lambda lib, a, b: fastclip.clip_by_norm_(a, 1.0, axis=1)),
    "clip_by_norm__0d_bound": _in_place(
        lambda lib, a, b: fastclip.clip_by_norm_(a, lib.asarray(0.5))
    ),
    "clip_by_norm__row_bounds": _in_place(
        lambda lib, a, b: fastclip.clip_by_norm_(
            a, lib.asarray(np.linspace(0.1, 2.0, 13)[:, None]), axis=1
        )
    ),
    "normalize_": _in_place(lambda lib, a, b: fastclip.normalize_(a, 3)),
    "clip_by_value_": _in_place(lambda lib, a, b: fastclip.clip_by_value_([a, b], -0.1, 0.2)),
    "clip_by_value__array_bounds": _in_place(
        lambda lib, a, b: fastclip.clip_by_value_(a, lib.asarray(LO), lib.asarray(HI))
    ),
    "clip_by_global_norm_": _in_place(
        lambda lib, a, b: fastclip.clip_by_global_norm_([a, b], 1.0, per_array=True)
    ),
    "clip_by_global_norm__total": _in_place(
        lambda lib, a, b: fastclip.clip_by_global_norm_([a, b], 1.0, total_norm=lib.asarray(3.0))
    ),
    "clip_by_global_norm__0d_bound": _in_place(
        lambda lib, a, b: fastclip.clip_by_global_norm_([a, b], lib.asarray(0.5))
    ),
    "scale_": _in_place(lambda lib, a, b: fastclip.scale_([a, b], lib.asarray(0.5))),
    "clip_by_block_rms_": _in_place(lambda lib, a, b: fastclip.clip_by_block_rms_([a, b], 0.2)),
    "clip_by_average_norm_": _in_place(lambda lib, a, b: fastclip.clip_by_average_norm_(a, 0.01)),
    "clip_by_block_rms__0d_bound": _in_place(
        lambda lib, a, b: fastclip.clip_by_block_rms_([a, b], lib.asarray(0.2))
    ),
    "clip_by_average_norm__0d_bound": _in_place(
        lambda lib, a, b: fastclip.clip_by_average_norm_(a, lib.asarray(np.float32(0.01)))
    ),
}


@pytest.mark.parametrize("chunks", list(CHUNKS), ids=list(CHUNKS))
@pytest.mark.parametrize("name", list(CALLS) + list(IN_PLACE))
def test_no_compute_during_the_call_and_numpy_values(name, chunks):
    call = CALLS.get(name) or IN_PLACE[name]
    d = _d(X, CHUNKS[chunks])
    recorder = Recorder()
    with dask.config.set(scheduler=recorder):
        got = call(da, d, d[:3])
    assert recorder.calls == 0
    leaves = _leaves(got)
    lazy = [leaf for leaf in leaves if isinstance(leaf, da.Array)]
    assert lazy, "a lazy result"
    assert all(isinstance(leaf, (da.Array, type(None))) for leaf in leaves), leaves
    leaves = [leaf for leaf in leaves if leaf is not None]
    computed = dask.compute(*leaves, scheduler="sync")
    want = [w for w in _leaves(call(np, X.copy(), X[:3].copy())) if w is not None]
    _same(list(computed), want)


@pytest.mark.parametrize("chunks", list(CHUNKS), ids=list(CHUNKS))
@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("reduce", ["sum", "mean", None])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_clip_per_sample_matches_the_float64_oracle(chunks, ord, per_layer, reduce, dtype):
    x = X.astype(dtype)
    y = sample((13, 2, 3), 6).astype(dtype)
    gs = [_d(x, CHUNKS[chunks]), _d(y, (4, 1, 3)), _d(x[:, 5], 3)]
    bounds = [1.0, 0.4, 0.3] if per_layer else 1.2
    recorder = Recorder()
    with dask.config.set(scheduler=recorder):
        res = fastclip.clip_per_sample(gs, bounds, ord, per_layer=per_layer, reduce=reduce)
    assert recorder.calls == 0
    assert isinstance(res.n_clipped, da.Array) and isinstance(res.norms, da.Array)
    outs, norms, n = dask.compute(res.grads, res.norms, res.n_clipped, scheduler="sync")
    arrays = [x, y, x[:, 5]]
    want, want_norms, want_n = ref.clip_per_sample(arrays, bounds, ord, per_layer, reduce)
    assert int(n) == want_n
    assert norms.dtype == np.dtype(dtype)
    assert_close(norms, want_norms, dtype)
    for o, w, a in zip(outs, want, arrays):
        assert o.dtype == a.dtype and o.shape == w.shape
        assert_close(o, w, dtype, atol=1e-6 if dtype == "float32" else 1e-12)
    counts = fastclip.clip_per_sample(arrays, bounds, ord, per_layer=per_layer).n_clipped_per_layer
    assert res.n_clipped_per_layer == counts  # computed on access, as documented


def test_clip_per_sample_extreme_float64_and_empty_batches():
    scale = 2.0**-1000
    x = sample((9, 7), 7)
    res = fastclip.clip_per_sample(_d(x * scale, (4, 3)), 1.0, eps=0.0, reduce=None)
    want, want_norms, _ = ref.clip_per_sample([x], 1.0 / scale, eps=0.0, reduce=None)
    np.testing.assert_allclose(res.norms.compute(), want_norms * scale, rtol=1e-13)
    np.testing.assert_allclose(res.grads.compute(), want[0] * scale, rtol=1e-12)
    empty = fastclip.clip_per_sample([da.zeros((0, 4), chunks=(1, 3))], 1.0, reduce="mean")
    assert int(empty.n_clipped) == 0 and empty.norms.compute().shape == (0,)
    np.testing.assert_array_equal(empty.grads[0].compute(), np.zeros(4))


# ------------------------------------------------- value rules, at compute time


def _vector(lib, values, dtype="float64"):
    """A 1-d bound; for dask in chunks of one element (the checks' index is global)."""
    v = np.asarray(values, dtype)
    return da.from_array(v, chunks=1) if lib is da else v


def _numpy_error(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call(np)
    return info.type, str(info.value)


BAD_VALUES = {
    "max_norm_negative": lambda lib, x: fastclip.clip_by_norm(x, lib.asarray(-1.0)),
    "max_norm_nan": lambda lib, x: fastclip.clip_by_norm_(x, lib.asarray(np.nan)),
    "max_norm_rows_negative": lambda lib, x: fastclip.clip_by_norm(
        x, lib.asarray(-np.ones((13, 1))), axis=1
    ),
    "max_norm_rows_nan": lambda lib, x: fastclip.clip_by_norm(
        x, lib.asarray(np.full((13, 1), np.nan)), axis=1
    ),
    "bounds_crossed": lambda lib, x: fastclip.clip_by_value(x, lib.asarray(2.0), lib.asarray(1.0)),
    "bound_nan": lambda lib, x: fastclip.clip_by_value(x, lib.asarray(np.nan), 1.0),
    "array_bounds_crossed": lambda lib, x: fastclip.clip_by_value(
        x, lib.asarray(HI), lib.asarray(LO)
    ),
    "array_bound_nan": lambda lib, x: fastclip.clip_by_value_(
        x, lib.asarray(np.full(17, np.nan)), lib.asarray(HI)
    ),
    "global_max_norm_negative": lambda lib, x: fastclip.clip_by_global_norm([x], lib.asarray(-2.0))[
        0
    ],
    "global_max_norm_f32_nan": lambda lib, x: fastclip.clip_by_global_norm_(
        [x], lib.asarray(np.float32([np.nan]))
    ),
    "total_norm_negative": lambda lib, x: fastclip.clip_by_global_norm_(
        [x], 1.0, total_norm=lib.asarray(-1.0)
    ),
    "block_rms_threshold_negative": lambda lib, x: fastclip.clip_by_block_rms(
        [x, x[:2]], lib.asarray(-1.0)
    ),
    "block_rms__threshold_nan": lambda lib, x: fastclip.clip_by_block_rms_(
        x, lib.asarray(np.float32([np.nan]))
    ),
    "average_norm_clip_norm_nan": lambda lib, x: fastclip.clip_by_average_norm(
        x, lib.asarray(np.nan)
    ),
    "average_norm__clip_norm_negative": lambda lib, x: fastclip.clip_by_average_norm_(
        x, lib.asarray(-2)
    ),
    "per_sample_max_norm_negative": lambda lib, x: fastclip.clip_per_sample(
        x, lib.asarray(-1.0), reduce=None
    ),
    "per_sample_max_norm_nan_layers": lambda lib, x: fastclip.clip_per_sample(
        [x, x[:, 2:]], lib.asarray(np.float32([[np.nan]])), per_layer=True
    ),
    "per_sample_layer_bound_nan": lambda lib, x: fastclip.clip_per_sample(
        [x, x[:, 2:], x[:, 1]], _vector(lib, [1.0, np.nan, -1.0], "float32"), per_layer=True
    ),
    "per_sample_layer_bound_negative": lambda lib, x: fastclip.clip_per_sample(
        [x, x[:, 2:]], lib.asarray([2, -1]), per_layer=True, reduce="mean"
    ),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_dask_argument_values_are_checked_in_the_graph(name):
    call = BAD_VALUES[name]
    kind, message = _numpy_error(lambda lib: call(lib, X.copy()))
    d = _d(X, CHUNKS["uneven"])
    recorder = Recorder()
    with dask.config.set(scheduler=recorder):
        result = call(da, d)  # no error yet: the value is not known
    assert recorder.calls == 0
    # the outputs (and, in place, the rebound array) raise once computed
    targets = [r for r in _leaves(result) if isinstance(r, da.Array)] + [d]
    with pytest.raises(kind, match=re.escape(message)):
        dask.compute(*targets, scheduler="sync")


def _raises_at_the_call_like_numpy(call) -> None:
    """``call(da, d)`` raises NumPy's error (type and message) at once, rebinding nothing."""
    kind, message = _numpy_error(lambda lib: call(lib, X.copy()))
    d = _d(X, (5, 6))
    name = d.name
    with dask.config.set(scheduler=Recorder()), pytest.raises(kind) as info:
        call(da, d)
    assert str(info.value) == message.replace("ndarray", "Array")
    assert d.name == name  # nothing rebound


def test_two_element_total_norm_and_factor_are_type_errors_like_numpy():
    for call in (
        lambda lib, x: fastclip.clip_by_global_norm([x], 1.0, total_norm=lib.ones(2)),
        lambda lib, x: fastclip.clip_by_global_norm_([x], 1.0, total_norm=lib.ones(2)),
        lambda lib, x: fastclip.scale_([x], lib.ones(2)),
        lambda lib, x: fastclip.clip_by_global_norm([x], 1.0, total_norm=lib.asarray(1j)),
        lambda lib, x: fastclip.clip_by_global_norm([x], lib.ones(2)),
    ):
        _raises_at_the_call_like_numpy(call)


# Dask bounds of the peers' clips and clip_per_sample: shape, dtype and structure
# errors at the call, with the NumPy route's type and message.
CALL_ERRORS = [
    lambda lib, x: fastclip.clip_by_block_rms([x], lib.ones(2)),
    lambda lib, x: fastclip.clip_by_block_rms_([x], lib.asarray(1j)),
    lambda lib, x: fastclip.clip_by_average_norm(x, lib.asarray(True)),
    lambda lib, x: fastclip.clip_by_average_norm_(x, lib.ones((1, 2))),
    lambda lib, x: fastclip.clip_per_sample(x, lib.ones((2, 1))),
    lambda lib, x: fastclip.clip_per_sample(x, lib.asarray(1j)),
    lambda lib, x: fastclip.clip_per_sample(x, lib.ones(1)),  # 1-d needs per_layer
    lambda lib, x: fastclip.clip_per_sample([x, x], _vector(lib, [1.0] * 3), per_layer=True),
    lambda lib, x: fastclip.clip_per_sample(
        [x, x], _vector(lib, [1, 0], "complex128"), per_layer=True
    ),
    lambda lib, x: fastclip.clip_per_sample([x, x], _vector(lib, [1, 0], bool), per_layer=True),
]


@pytest.mark.parametrize("k", range(len(CALL_ERRORS)))
def test_dask_bound_shapes_and_dtypes_raise_at_the_call_like_numpy(k):
    _raises_at_the_call_like_numpy(CALL_ERRORS[k])


@pytest.mark.parametrize("chunks", list(CHUNKS), ids=list(CHUNKS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dask_bounds_of_peer_clips_and_clip_per_sample_match_the_oracle(chunks, dtype):
    x = X.astype(dtype)
    d = _d(x, CHUNKS[chunks])
    tau, c = 0.2, 0.01
    with dask.config.set(scheduler=Recorder()):
        rms = fastclip.clip_by_block_rms([d, d[:3]], da.asarray(tau))
        avg = fastclip.clip_by_average_norm(d, da.asarray(c))
        flat = fastclip.clip_per_sample([d, d[:, 0]], da.asarray(1.0), 3, reduce=None)
        bounds = [1.0, 0.4, 0.3]
        layers = fastclip.clip_per_sample(
            [d, d[:, 5:], d[:, 0]], _vector(da, bounds), per_layer=True, eps=0.0
        )
    tol = 1e-6 if dtype == "float32" else 1e-12
    for got, a in zip(rms, [x, x[:3]]):
        want = ref.clip_by_norm(a, tau * math.sqrt(a.size), eps=0.0)
        assert got.dtype == a.dtype
        assert_close(got.compute(), want, dtype, atol=tol)
    assert_close(avg.compute(), ref.clip_by_norm(x, c * x.size, eps=0.0), dtype, atol=tol)
    want, want_norms, want_n = ref.clip_per_sample([x, x[:, 0]], 1.0, 3, False, None)
    outs, norms, n = dask.compute(*flat, scheduler="sync")
    assert int(n) == want_n
    assert_close(norms, want_norms, dtype)
    for o, w in zip(outs, want):
        assert_close(o, w, dtype, atol=tol)
    arrays = [x, x[:, 5:], x[:, 0]]
    want, want_norms, want_n = ref.clip_per_sample(arrays, bounds, 2, True, "sum", eps=0.0)
    outs, norms, n = dask.compute(*layers, scheduler="sync")
    assert int(n) == want_n
    assert_close(norms, want_norms, dtype)
    for o, w in zip(outs, want):
        assert_close(o, w, dtype, atol=tol)
    counts = fastclip.clip_per_sample(arrays, bounds, per_layer=True, eps=0.0).n_clipped_per_layer
    assert layers.n_clipped_per_layer == counts  # computed on access, as documented
    bad = fastclip.clip_per_sample([d, d[:, 5:]], _vector(da, [1.0, -1.0]), per_layer=True)
    with pytest.raises(ValueError, match=re.escape("max_norm[1] must be >= 0 and not NaN")):
        bad.n_clipped_per_layer  # noqa: B018


EMPTY_IN_PLACE = {
    "clip_by_norm_": lambda lib, x: fastclip.clip_by_norm_(x, 0.5),
    "normalize_": lambda lib, x: fastclip.normalize_(x, 1),
    "clip_by_value_": lambda lib, x: fastclip.clip_by_value_(x, -0.1, 0.1),
    "clip_by_global_norm_": lambda lib, x: fastclip.clip_by_global_norm_([x], 1.0),
    "scale_": lambda lib, x: fastclip.scale_([x], 0.5),
    "clip_by_average_norm_": lambda lib, x: fastclip.clip_by_average_norm_(x, lib.asarray(0.1)),
    "clip_by_block_rms_": lambda lib, x: fastclip.clip_by_block_rms_(x, lib.asarray(0.1)),
}


@pytest.mark.parametrize("name", list(EMPTY_IN_PLACE))
def test_in_place_on_an_empty_array_is_lazy_and_returns_numpys_values(name):
    call = EMPTY_IN_PLACE[name]
    x = np.zeros((0, 3))
    want = call(np, x)
    d = da.zeros((0, 3), chunks=(1, 2))
    with dask.config.set(scheduler=Recorder()):
        got = call(da, d)
    if want is None or want is x:  # scale_ and clip_by_value_ return no norm
        assert got is None or got is d
    else:
        _same(got.compute(), want)
        assert_close(np.asarray(want), ref.norm(x), "float64")  # the norm of nothing: 0
    assert d.compute().shape == (0, 3)


def test_the_same_array_twice_in_place_is_refused_like_numpy():
    calls = [
        lambda x: fastclip.clip_by_global_norm_([x, x], 1.0),
        lambda x: fastclip.scale_([x, x], 0.5),
        lambda x: fastclip.clip_by_value_([x, x], -0.1, 0.1),
        lambda x: fastclip.clip_by_block_rms_([x, x], 0.1),
    ]
    for call in calls:
        kind, message = _numpy_error(lambda lib, call=call: call(X.copy()))
        d = _d(X, (5, 6))
        name = d.name
        with dask.config.set(scheduler=Recorder()), pytest.raises(kind) as info:
            call(d)
        prefix = message.split(" share memory")[0]  # "[fastclip.fn: ]arrays 0 and 1 of ..."
        assert str(info.value).startswith(prefix + " are the same dask array")
        assert d.name == name  # nothing rebound
    # one value under two objects is two arrays (as NumPy's [x, x.copy()]): both clipped
    d = _d(X, (5, 6))
    e = d.copy()
    assert e is not d and e.name == d.name
    total = fastclip.clip_by_global_norm_([d, e], 1.0, eps=0.0)
    want, want_total = ref.clip_by_global_norm([X, X], 1.0, eps=0.0)
    assert_close(total.compute(), want_total, "float64")
    assert_close(d.compute(), want[0], "float64")
    assert_close(e.compute(), want[1], "float64")


# ------------------------------------------------------------ property test


@st.composite
def _chunked(draw):
    # B >= 1: the oracle reshapes by -1 (empty batches: the test above)
    b, d = draw(st.integers(1, 9)), draw(st.integers(1, 7))

    def cuts(n: int) -> tuple[int, ...]:
        sizes, left = [], n
        while left > 0:
            sizes.append(draw(st.integers(1, left)))
            left -= sizes[-1]
        return tuple(sizes)

    return b, d, (cuts(b), cuts(d)), draw(st.sampled_from(ORDS)), draw(st.integers(0, 99))


@settings(max_examples=25, deadline=None)
@given(case=_chunked(), per_layer=st.booleans(), bound=st.floats(0.0, 3.0))
def test_clip_per_sample_any_chunking_matches_the_oracle(case, per_layer, bound):
    b, d, chunks, ord, seed = case
    x = sample((b, d), seed)
    g = [_d(x, chunks), _d(x[:, :1], (chunks[0], 1))]
    res = fastclip.clip_per_sample(g, bound, ord, per_layer=per_layer, eps=0.0)
    outs, norms, n = dask.compute(res.grads, res.norms, res.n_clipped, scheduler="sync")
    want, want_norms, want_n = ref.clip_per_sample([x, x[:, :1]], bound, ord, per_layer, eps=0.0)
    assert int(n) == want_n
    assert_close(norms, want_norms, "float64")
    for o, w in zip(outs, want):
        assert_close(o, w, "float64", atol=1e-12)


def test_dask_bounds_need_dask_floating_x():
    """A dask bound is never computed to serve another library, nor integer data."""
    lo = da.asarray(0.1)
    with dask.config.set(scheduler=Recorder()):
        with pytest.raises(TypeError, match="never moves data between libraries"):
            fastclip.clip_by_value(X, lo, 1.0)
        with pytest.raises(TypeError, match="never moves data between libraries"):
            fastclip.clip_by_norm(X, lo)
        with pytest.raises(TypeError, match="dask array but the arrays are not"):
            fastclip.clip_by_global_norm([X], lo)
        for call in (
            lambda: fastclip.clip_by_block_rms([X], lo),
            lambda: fastclip.clip_by_block_rms_(X.copy(), lo),
            lambda: fastclip.clip_by_average_norm(X, lo),
            lambda: fastclip.clip_by_average_norm_(X.copy(), lo),
            lambda: fastclip.clip_per_sample(X, lo),
            lambda: fastclip.clip_per_sample([X, X], da.ones(2), per_layer=True),
        ):
            with pytest.raises(TypeError, match="dask array but the arrays are not"):
                call()
        with pytest.raises(TypeError, match="pass scalar bounds for integer"):
            fastclip.clip_by_value(da.arange(5, chunks=2), lo, 3)
    got = fastclip.clip_by_value(da.arange(5, chunks=2), 0.5, 3.5).compute()  # numbers: fine
    np.testing.assert_array_equal(got, ref.clip_by_value(np.arange(5), 1, 3))
