"""Dask per-array bounds: a list holding dask scalars stays lazy on the Dask route
(its values checked in the graph with the NumPy route's messages), dask bounds of
unknown length (NaN chunk sizes) are refused at the call with a message that says
so, and the peers' clips reach the Dask route's bound check through
``Backend.lazy_bound``.  Values are checked against the NumPy route and the float64
oracle of tests/reference.py.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

da = pytest.importorskip(
    "dask.array", reason="dask is not installed (pip install 'dask[array]', the 'dask' extra)"
)
import dask  # noqa: E402
import reference as ref  # noqa: E402
from _backends import assert_close, sample  # noqa: E402

import fastclip  # noqa: E402
from fastclip import _dispatch  # noqa: E402

X = sample((13, 17), 7)
X[2] *= 0.01  # a row below every bound
PREFIX = "fastclip.clip_per_sample: "


def _forbid(dsk, keys, **kwargs):
    raise AssertionError("a dask graph was computed during the call")


def _arrays(x: np.ndarray) -> list[np.ndarray]:
    return [x, x[:, 5:], x[:, 0]]


def _route_clip(items, bounds, reduce="sum", eps=0.0):
    """The Dask route's clip_per_sample through its Backend, no compute allowed."""
    backend = _dispatch.backend_for(items, defer_numpy=False)
    assert backend.route == _dispatch.ROUTE_DASK
    with dask.config.set(scheduler=_forbid):
        return backend.clip_per_sample(
            items, items[0].shape[0], 2, 2.0, bounds=bounds, per_layer=True, reduce=reduce, eps=eps
        )


@pytest.mark.parametrize("reduce", [None, "sum", "mean"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_list_of_dask_scalars_stays_lazy_and_matches_numpy_and_the_oracle(reduce, dtype):
    x = X.astype(dtype)
    d = da.from_array(x, chunks=((5, 1, 7), (3, 9, 5)))
    values = [1.0, 0.375, 0.3]  # 0.375: the same bound in float32 and float64
    # dask scalars of two dtypes and a plain number, mixed
    bounds = [da.asarray(values[0]), da.asarray(np.float32(values[1])), values[2]]
    outs, norms, n = _route_clip(_arrays(d), bounds, reduce)
    outs, norms, n = dask.compute(outs, norms, n, scheduler="sync")
    want, want_norms, want_n = ref.clip_per_sample(_arrays(x), values, 2, True, reduce, eps=0.0)
    numpy = fastclip.clip_per_sample(_arrays(x), values, per_layer=True, reduce=reduce, eps=0.0)
    assert int(n) == want_n == numpy.n_clipped
    assert_close(norms, want_norms, dtype)
    np.testing.assert_allclose(norms, numpy.norms, rtol=1e-6 if dtype == "float32" else 1e-14)
    tol = 1e-6 if dtype == "float32" else 1e-12
    for o, w, v in zip(outs, want, numpy.grads):
        assert o.dtype == np.dtype(dtype)
        assert_close(o, w, dtype, atol=tol)
        np.testing.assert_allclose(o, v, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "bad",
    [np.float32(-1.0), np.nan, -np.inf],
    ids=["negative_float32", "nan", "minus_inf"],
)
def test_a_bad_dask_scalar_of_the_list_raises_numpys_error_when_computed(bad):
    items = _arrays(X)
    bounds = [np.asarray(1.0), np.asarray(bad), np.asarray(0.5)]
    with pytest.raises(ValueError) as info:
        fastclip.clip_per_sample(items, bounds, per_layer=True)
    message = str(info.value)
    assert message.startswith(PREFIX + "max_norm[1] must be >= 0 and not NaN")
    d = da.from_array(X, chunks=(4, 6))
    outs, _norms, n = _route_clip(_arrays(d), [da.asarray(b) for b in bounds])  # no error yet
    for target in (outs[0], n):  # everything that depends on the bounds raises
        with pytest.raises(ValueError, match=re.escape(message)):
            dask.compute(target, scheduler="sync")


@pytest.mark.parametrize(
    "bad",
    [np.asarray(1j), np.asarray(True), np.ones(2), -1.0, math.nan],
    ids=["complex", "bool", "two_elements", "negative_number", "nan_number"],
)
def test_a_bad_element_of_the_list_raises_numpys_error_at_the_call(bad):
    items = _arrays(X)
    with pytest.raises((TypeError, ValueError)) as info:
        fastclip.clip_per_sample(items, [1.0, bad, np.asarray(0.5)], per_layer=True)
    kind, message = info.type, str(info.value)
    assert message.startswith(PREFIX + "max_norm[1] must")
    d = da.from_array(X, chunks=(4, 6))
    lazy = da.asarray(bad) if hasattr(bad, "shape") else bad
    with pytest.raises(kind) as got:
        _route_clip(_arrays(d), [1.0, lazy, da.asarray(0.5)])
    # the route raises without the public function's name; the API adds it
    assert PREFIX + str(got.value) == message.replace("ndarray", "Array")


def test_a_list_of_dask_scalars_through_clip_per_sample_stays_lazy():
    d = da.from_array(X, chunks=(4, 6))
    values = [1.0, 0.4, 0.3]
    with dask.config.set(scheduler=_forbid):
        res = fastclip.clip_per_sample(
            _arrays(d), [da.asarray(v) for v in values], per_layer=True, eps=0.0
        )
    want, want_norms, want_n = ref.clip_per_sample(_arrays(X), values, 2, True, "sum", eps=0.0)
    outs, norms, n = dask.compute(res.grads, res.norms, res.n_clipped, scheduler="sync")
    assert int(n) == want_n
    assert_close(norms, want_norms, "float64")
    for o, w in zip(outs, want):
        assert_close(o, w, "float64", atol=1e-12)


def _unknown_length(values) -> da.Array:
    """A 1-d dask array whose length is unknown (NaN chunk sizes), by boolean indexing."""
    v = da.from_array(np.asarray(values, np.float64), chunks=1)
    return v[v > 0]


def _says_unknown_length(message: str, name: str) -> None:
    assert "nan" not in message.replace("NaN chunk sizes", "")
    assert f"{name} is a dask array of unknown length" in message
    assert f"call {name}.compute_chunk_sizes() first" in message


def test_a_dask_bound_of_unknown_length_is_refused_on_the_route_with_the_fix():
    d = da.from_array(X, chunks=(4, 6))
    with pytest.raises(ValueError) as info:
        _route_clip(_arrays(d), _unknown_length([1.0, -1.0, 0.5, 2.0]))
    _says_unknown_length(str(info.value), "max_norm")
    # the same bound with its chunk sizes computed: accepted, NumPy's values
    known = _unknown_length([1.0, -1.0, 0.5, 2.0]).compute_chunk_sizes()
    outs, norms, n = dask.compute(*_route_clip(_arrays(d), known), scheduler="sync")
    numpy = fastclip.clip_per_sample(_arrays(X), [1.0, 0.5, 2.0], per_layer=True, eps=0.0)
    np.testing.assert_allclose(norms, numpy.norms, rtol=1e-14)
    assert int(n) == numpy.n_clipped
    for o, v in zip(outs, numpy.grads):
        np.testing.assert_allclose(o, v, rtol=1e-12, atol=1e-12)


def test_clip_per_sample_refuses_a_bound_of_unknown_length_with_the_fix():
    d = da.from_array(X, chunks=(4, 6))
    with pytest.raises(ValueError) as info:
        fastclip.clip_per_sample(_arrays(d), _unknown_length([1.0, 0.5, 2.0]), per_layer=True)
    assert str(info.value).startswith(PREFIX)
    _says_unknown_length(str(info.value), "max_norm")


@pytest.mark.parametrize(
    "fn, name",
    [
        ("clip_by_block_rms", "threshold"),
        ("clip_by_block_rms_", "threshold"),
        ("clip_by_average_norm", "clip_norm"),
        ("clip_by_average_norm_", "clip_norm"),
    ],
)
def test_peer_clip_bounds_of_unknown_length_are_refused_at_the_call(fn, name):
    def call(x, b):
        return getattr(fastclip, fn)([x, x[:2]] if fn == "clip_by_block_rms" else x, b)

    d = da.from_array(X, chunks=(4, 6))
    before = d.name
    with dask.config.set(scheduler=_forbid), pytest.raises(ValueError) as info:
        call(d, _unknown_length([0.5, -1.0]))  # one element, but dask cannot know it
    message = str(info.value)
    assert message.startswith(f"fastclip.{fn}: ")
    _says_unknown_length(message, name)
    assert d.name == before  # nothing rebound
    # with its chunk sizes computed it is the size-1 bound it is: NumPy's values
    known = _unknown_length([0.5, -1.0]).compute_chunk_sizes()
    got = call(d, known)
    want = call(X.copy(), np.asarray([0.5]))
    for g, w in zip(
        got if isinstance(got, list) else [got], want if isinstance(want, list) else [want]
    ):
        np.testing.assert_allclose(g.compute(), w, rtol=1e-12, atol=1e-15)


def test_backend_lazy_bound_on_each_route():
    d = da.from_array(X, chunks=(4, 6))
    dask_backend = _dispatch.backend_for([d], defer_numpy=False)
    with dask.config.set(scheduler=_forbid):
        lazy = dask_backend.lazy_bound(
            da.asarray(np.float32(-2.0)), "clip_by_block_rms", "threshold"
        )
    assert isinstance(lazy, da.Array) and lazy.shape == () and lazy.dtype == np.float64
    message = "fastclip.clip_by_block_rms: threshold must be >= 0 and not NaN, got array(-2., "
    with pytest.raises(ValueError, match=re.escape(message)):
        lazy.compute(scheduler="sync")
    good = dask_backend.lazy_bound(da.asarray(0.25), "clip_by_block_rms", "threshold")
    assert float(good.compute(scheduler="sync")) == 0.25
    assert dask_backend.lazy_bound(0.25, "clip_by_block_rms", "threshold") == 0.25
    numpy_backend = _dispatch.backend_for([X], defer_numpy=False)
    assert numpy_backend.lazy_bound(0.25, "clip_by_block_rms", "threshold") == 0.25
    with pytest.raises(TypeError, match="threshold is a dask array but the arrays are not"):
        numpy_backend.lazy_bound(da.asarray(0.25), "clip_by_block_rms", "threshold")


@pytest.mark.parametrize("fn", ["clip_by_value", "clip_by_norm"])
def test_array_bounds_of_unknown_length_are_refused_with_the_fix(fn):
    x = np.arange(-4.0, 5.0).reshape(3, 3)
    d = da.from_array(x, chunks=2)
    raw = da.from_array(np.array([1.0, 2.0, -3.0, 4.0]), chunks=2)
    b = raw[raw > 0]  # NaN chunk sizes
    name = "max" if fn == "clip_by_value" else "max_norm"

    def call(bound):
        if fn == "clip_by_value":
            return fastclip.clip_by_value(d, None, bound)
        return fastclip.clip_by_norm(d, bound[None, :], axis=0)

    with pytest.raises(ValueError, match=rf"{name} has unknown length .*compute_chunk_sizes"):
        call(b)
    got = call(b.compute_chunk_sizes()).compute()
    bound = np.array([1.0, 2.0, 4.0])
    if fn == "clip_by_value":
        want = np.minimum(x, bound)
    else:
        want = ref.clip_by_norm(x, bound[None, :], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-12)
