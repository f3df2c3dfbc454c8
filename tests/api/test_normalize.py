"""fastclip.normalize (new array) and normalize_ (in place, returns the norms before).

This file owns normalize and normalize_ on the backend matrix; bad arguments are in
test_bad_input.py, the Dask route in tests/routes/test_dask.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from _backends import CPU, WRITEABLE, Backend, assert_close, norm_dtype, params, sample
from _backends import ORDS as BASE_ORDS

import fastclip

ORDS = (*BASE_ORDS, 0.5)
AXES = [None, 1, -1, (0, 2), (1, 2)]


def _expected(backend, x, dtype, ord, axis, eps=1e-6):
    x64 = backend.to_numpy(x)
    out = ref.normalize(x64, ord, axis=axis, eps=eps)
    if dtype in ("float16", "bfloat16"):
        out = backend.round_to(out, dtype)
    return out, ref.norm(x64, ord, axis=axis)


@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params())
def test_normalize_out_of_place(backend, dtype, ord, axis):
    x = backend.asarray(sample((3, 4, 5), seed=1), dtype)
    before = backend.to_numpy(x)
    expected, _ = _expected(backend, x, dtype, ord, axis)
    got = fastclip.normalize(x, ord, axis=axis)
    backend.assert_array(got, x, dtype, (3, 4, 5))
    assert_close(backend.to_numpy(got), expected, dtype)
    np.testing.assert_array_equal(backend.to_numpy(x), before)


@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(WRITEABLE))
def test_normalize_in_place_returns_norms_before(backend, dtype, ord, axis):
    x = backend.asarray(sample((3, 4, 5), seed=2), dtype)
    expected, norms = _expected(backend, x, dtype, ord, axis)
    got = fastclip.normalize_(x, ord, axis=axis)
    backend.assert_array(got, x, norm_dtype(dtype), norms.shape)
    assert_close(backend.to_numpy(got), norms, norm_dtype(dtype))
    assert_close(backend.to_numpy(x), expected, dtype)


@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["float32", "float64"]))
def test_normalized_norm_is_one_and_zero_stays_zero(backend, dtype):
    x = backend.asarray(np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]]), dtype)
    with np.errstate(all="ignore"):  # eps=0 asks for 0/0 on the zero row
        got = backend.to_numpy(fastclip.normalize(x, axis=1, eps=0.0))
    assert_close(np.linalg.norm(got[[0, 2]], axis=1), np.ones(2), dtype)
    assert np.isnan(got[1]).all()  # 0 / (0 + 0): NaN, as x / (norm + eps) says
    got = backend.to_numpy(fastclip.normalize(x, axis=1))  # default eps keeps zeros finite
    assert_close(got, ref.normalize(backend.to_numpy(x), axis=1), dtype)
    assert (got[1] == 0).all()


@pytest.mark.parametrize("axis", [None, 0, 1], ids=str)
@pytest.mark.parametrize("backend", [Backend.NUMPY, Backend.TORCH], ids=str)
def test_normalize_in_place_on_views(backend, axis):
    base = backend.asarray(sample((6, 8), seed=3), "float32")
    for view in (base[:, ::2], base.T, base[1:, 2:]):
        snapshot = backend.to_numpy(view)
        norms = fastclip.normalize_(view, axis=axis)
        assert_close(backend.to_numpy(norms), ref.norm(snapshot, axis=axis), "float32")
        assert_close(backend.to_numpy(view), ref.normalize(snapshot, axis=axis), "float32")


@pytest.mark.parametrize("axis", [None, 0, 1], ids=str)
@pytest.mark.parametrize(
    ("backend", "dtype"),
    params([Backend.NUMPY, Backend.TORCH], ["bfloat16", "float16", "float32", "float64"]),
)
def test_normalize_small_chunks(small_chunks, backend, dtype, axis):
    x = backend.asarray(sample((9, 11), seed=4), dtype)
    expected, norms = _expected(backend, x, dtype, 2, axis)
    assert_close(backend.to_numpy(fastclip.normalize(x, axis=axis)), expected, dtype)
    assert_close(backend.to_numpy(fastclip.normalize_(x, axis=axis)), norms, norm_dtype(dtype))
    assert_close(backend.to_numpy(x), expected, dtype)


@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["complex64", "complex128"]))
def test_normalize_complex(backend, dtype):
    x = backend.asarray(sample((3, 4), seed=5, kind="complex"), dtype)
    got = fastclip.normalize(x, axis=1)
    backend.assert_array(got, x, dtype, (3, 4))
    assert_close(backend.to_numpy(got), ref.normalize(backend.to_numpy(x), axis=1), dtype)


@pytest.mark.parametrize("backend", CPU, ids=str)
def test_normalize_nan_propagates(backend):
    data = sample((2, 3), seed=6)
    data[0, 1] = np.nan
    x = backend.asarray(data, "float32")
    assert np.isnan(backend.to_numpy(fastclip.normalize(x))).all()
    rows = backend.to_numpy(fastclip.normalize(x, axis=1))
    assert np.isnan(rows[0]).all()
    assert_close(rows[1], ref.normalize(data[1:], axis=1)[0], "float32")
