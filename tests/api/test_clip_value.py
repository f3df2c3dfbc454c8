"""fastclip.clip_by_value (new array) and clip_by_value_ (in place, returns x).

This file owns clip_by_value and clip_by_value_ on the backend matrix, integer and bool
data included (saturating bounds too); many-array value clipping is in
test_safety_api.py, the Dask route in tests/routes/test_dask.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from _backends import (
    CPU,
    SATURATING_INT_BOUNDS,
    WRITEABLE,
    Backend,
    assert_close,
    params,
    sample,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fastclip

BOUNDS = [(-0.5, 0.5), (None, 0.25), (-0.25, None), (0.1, 0.1), (-np.inf, np.inf)]


def _data():
    data = sample((4, 7), seed=1)
    data[0, 0] = np.nan
    data[1, 1] = np.inf
    data[2, 2] = -np.inf
    return data


@pytest.mark.parametrize("bounds", BOUNDS, ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params())
def test_clip_by_value_out_of_place(backend, dtype, bounds):
    x = backend.asarray(_data(), dtype)
    before = backend.to_numpy(x)
    got = fastclip.clip_by_value(x, *bounds)
    backend.assert_array(got, x, dtype, tuple(x.shape))
    expected = ref.clip_by_value(before, *bounds)
    if dtype in ("float16", "bfloat16"):
        expected = backend.round_to(expected, dtype)
    assert_close(backend.to_numpy(got), expected, dtype)
    np.testing.assert_array_equal(backend.to_numpy(x), before)


@pytest.mark.parametrize("bounds", BOUNDS, ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(WRITEABLE))
def test_clip_by_value_in_place_returns_x(backend, dtype, bounds):
    x = backend.asarray(_data(), dtype)
    expected = ref.clip_by_value(backend.to_numpy(x), *bounds)
    if dtype in ("float16", "bfloat16"):
        expected = backend.round_to(expected, dtype)
    assert fastclip.clip_by_value_(x, *bounds) is x
    assert_close(backend.to_numpy(x), expected, dtype)


@pytest.mark.parametrize("as_iter", [list, iter], ids=["list", "generator"])
@pytest.mark.parametrize(("backend", "dtype"), params(WRITEABLE, ["float32"]))
def test_clip_by_value_in_place_of_many_returns_a_new_list_of_the_same_arrays(
    backend, dtype, as_iter
):
    """As documented: a list or iterable gives back a new list whose items are the
    caller's own arrays, each clipped in its memory."""
    xs = [backend.asarray(sample(n, seed=n), dtype) for n in (5, 9)]
    expected = [ref.clip_by_value(backend.to_numpy(x), -0.3, 0.2) for x in xs]
    given_xs = list(xs)
    got = fastclip.clip_by_value_(as_iter(given_xs), -0.3, 0.2)
    assert type(got) is list and got is not given_xs
    assert len(got) == len(xs) and all(a is b for a, b in zip(got, xs))
    for x, want in zip(xs, expected):
        assert_close(backend.to_numpy(x), want, dtype)


@pytest.mark.parametrize(
    "bounds", [(-2.5, 2.5), (-2, None), (None, 1), (3.5, 1e12), (-1e12, -1e11)], ids=str
)
@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["int32", "int64"]))
def test_clip_by_value_integers(backend, dtype, bounds):
    """Integer data stays integer; fractional bounds are rounded inward."""
    data = np.arange(-5, 7).reshape(3, 4)
    x = backend.asarray(data, dtype)
    got = fastclip.clip_by_value(x, *bounds)
    backend.assert_array(got, x, dtype, (3, 4))
    np.testing.assert_array_equal(
        backend.to_numpy(got), ref.clip_by_value(data.astype(dtype), *bounds)
    )
    np.testing.assert_array_equal(backend.to_numpy(x), data)
    if backend.writeable:
        assert fastclip.clip_by_value_(x, *bounds) is x
        np.testing.assert_array_equal(
            backend.to_numpy(x), ref.clip_by_value(data.astype(dtype), *bounds)
        )


@pytest.mark.parametrize("bounds", [(0, 1), (-1, None), (None, 2), (1, None), (0, 0)], ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["bool"]))
def test_clip_by_value_bool(backend, dtype, bounds):
    """Bools are the integers 0 and 1: bounds outside [0, 1] change nothing."""
    data = np.array([True, False, True, False])
    x = backend.asarray(data, "bool")
    got = fastclip.clip_by_value(x, *bounds)
    backend.assert_array(got, x, "bool", (4,))
    np.testing.assert_array_equal(backend.to_numpy(got), ref.clip_by_value(data, *bounds))


@pytest.mark.parametrize("backend", [Backend.NUMPY, Backend.TORCH], ids=str)
def test_clip_by_value_in_place_on_views(backend):
    base = backend.asarray(sample((6, 8), seed=2), "float32")
    outside = backend.to_numpy(base)
    views = [base[:, ::2], base.T, base[1:, 3:]]
    if backend.is_numpy:
        views.append(np.asfortranarray(backend.to_numpy(base).astype(np.float32)))
    for view in views:
        snapshot = backend.to_numpy(view)
        assert fastclip.clip_by_value_(view, -0.3, 0.3) is view
        assert_close(backend.to_numpy(view), ref.clip_by_value(snapshot, -0.3, 0.3), "float32")
    clipped = ref.clip_by_value(outside, -0.3, 0.3)
    assert_close(backend.to_numpy(base), clipped, "float32")  # through the views, in base's memory


def test_clip_by_value_in_place_on_a_grad():
    import torch

    p = torch.nn.Parameter(torch.zeros(5, 3))
    p.grad = torch.tensor(sample((5, 3), seed=3), dtype=torch.float32)
    expected = ref.clip_by_value(p.grad.numpy(), -0.1, 0.2)
    assert fastclip.clip_by_value_(p.grad, -0.1, 0.2) is p.grad
    assert_close(p.grad.numpy(), expected, "float32")


@pytest.mark.parametrize(
    ("backend", "dtype"),
    params([Backend.NUMPY, Backend.TORCH], ["bfloat16", "float16", "float32", "float64"]),
)
def test_clip_by_value_small_chunks(small_chunks, backend, dtype):
    x = backend.asarray(sample(60, seed=4), dtype)
    expected = ref.clip_by_value(backend.to_numpy(x), -0.5, 0.7)
    if dtype in ("float16", "bfloat16"):
        expected = backend.round_to(expected, dtype)
    assert_close(backend.to_numpy(fastclip.clip_by_value(x, -0.5, 0.7)), expected, dtype)
    fastclip.clip_by_value_(x, -0.5, 0.7)
    assert_close(backend.to_numpy(x), expected, dtype)


@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["float32"]))
def test_clip_by_value_zero_size_and_array_bounds(backend, dtype):
    x = backend.asarray(np.zeros((0, 3)), dtype)
    backend.assert_array(fastclip.clip_by_value(x, -1, 1), x, dtype, (0, 3))
    y = backend.asarray(sample(5, seed=5), dtype)
    lo = np.asarray(-0.2) if not backend.is_torch else backend.module().tensor(-0.2)
    got = fastclip.clip_by_value(y, lo, 0.2)  # a 0-d array bound
    assert_close(backend.to_numpy(got), ref.clip_by_value(backend.to_numpy(y), -0.2, 0.2), dtype)


# ------------------------------------ integers: saturating and huge bounds


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32", "int64", "bool"])
@pytest.mark.parametrize(("lo", "hi"), SATURATING_INT_BOUNDS)
def test_integer_clip_by_value_saturates(cpu_backend, dtype, lo, hi):
    raw = np.array([-128, -3, 0, 1, 5, 127]) if dtype != "bool" else np.array([0, 1, 1, 0])
    data = raw.astype(dtype) if dtype != "uint8" else np.abs(raw).astype(dtype)
    x = cpu_backend.asarray(data, dtype)
    before = cpu_backend.to_numpy(x)
    out = fastclip.clip_by_value(x, lo, hi)
    np.testing.assert_array_equal(cpu_backend.to_numpy(out), ref.clip_by_value(data, lo, hi))
    np.testing.assert_array_equal(cpu_backend.to_numpy(x), before)
    if cpu_backend.writeable:
        fastclip.clip_by_value_(x, lo, hi)
        np.testing.assert_array_equal(cpu_backend.to_numpy(x), ref.clip_by_value(data, lo, hi))


@settings(max_examples=80, deadline=None)
@given(
    dtype=st.sampled_from(["int8", "uint8", "int16", "int64", "bool"]),
    lo=st.one_of(st.none(), st.floats(allow_nan=False)),
    hi=st.one_of(st.none(), st.floats(allow_nan=False)),
    seed=st.integers(0, 10),
)
def test_integer_clip_by_value_matches_the_oracle(dtype, lo, hi, seed):
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        data = rng.integers(0, 2, 12).astype(bool)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(int(info.min), int(info.max), 12, endpoint=True, dtype=dtype)
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    if lo is None and hi is None:
        hi = math.inf  # one bound is required
    np.testing.assert_array_equal(
        fastclip.clip_by_value(data, lo, hi), ref.clip_by_value(data, lo, hi)
    )
