"""fastclip.norm and fastclip.global_norm against the float64 oracle on every backend.

This file owns norm and global_norm on the backend matrix (dtypes, orders, axes,
keepdims, empty and non-finite inputs, accuracy, small chunks); the zero-norm rule is in
test_zero_norm_rule.py, the Dask route in tests/routes/test_dask.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from _backends import CPU, FRACTIONAL_ORDS, Backend, assert_close, norm_dtype, params, sample
from _backends import ORDS as BASE_ORDS

import fastclip

ORDS = (*BASE_ORDS, *FRACTIONAL_ORDS)
AXES_3D = [None, 0, 1, 2, -1, -3, (0, 1), (1, 2), (0, 2), (-1, 0), (0, 1, 2)]
AXES_4D = [(1, 2), (0, 3), (1,), (2, 3), (0, 1), (0, 2)]  # middle, outer, single, trailing, ...


def _check_norm(backend, x, dtype, ord, axis=None, keepdims=False):
    got = fastclip.norm(x, ord, axis=axis, keepdims=keepdims)
    expected = ref.norm(backend.to_numpy(x), ord, axis=axis, keepdims=keepdims)
    backend.assert_array(got, x, norm_dtype(dtype), expected.shape)
    assert_close(backend.to_numpy(got), expected, norm_dtype(dtype))
    return got


@pytest.mark.parametrize("axis", AXES_3D, ids=str)
@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params())
def test_norm_matrix(backend, dtype, ord, axis):
    x = backend.asarray(sample((4, 5, 6), seed=1), dtype)
    before = backend.to_numpy(x)
    _check_norm(backend, x, dtype, ord, axis)
    np.testing.assert_array_equal(backend.to_numpy(x), before)  # input untouched


@pytest.mark.parametrize("axis", AXES_3D, ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(dtypes=["bfloat16", "float32", "float64"]))
def test_norm_keepdims(backend, dtype, axis):
    x = backend.asarray(sample((4, 5, 6), seed=1), dtype)
    for ord in (1, 2, math.inf, 3):
        _check_norm(backend, x, dtype, ord, axis, keepdims=True)


@pytest.mark.parametrize("axis", AXES_4D, ids=str)
@pytest.mark.parametrize("ord", [1, 2, math.inf, 3], ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(dtypes=["bfloat16", "float32", "float64"]))
def test_norm_4d_axes(backend, dtype, ord, axis):
    x = backend.asarray(sample((2, 3, 4, 5), seed=2), dtype)
    _check_norm(backend, x, dtype, ord, axis)


@pytest.mark.parametrize("axis", [None, 0, 1, (0, 1)], ids=str)
@pytest.mark.parametrize("ord", [1, 2, math.inf, 3], ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(dtypes=["complex64", "complex128"]))
def test_norm_complex_uses_modulus(backend, dtype, ord, axis):
    x = backend.asarray(sample((5, 6), seed=3, kind="complex"), dtype)
    _check_norm(backend, x, dtype, ord, axis)


@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["float16", "float32", "float64"]))
def test_norm_0d_and_single_element(backend, dtype):
    _check_norm(backend, backend.asarray(np.array(-3.0), dtype), dtype, 2)
    _check_norm(backend, backend.asarray(np.array([-3.0]), dtype), dtype, 2, keepdims=True)


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3], ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["float32", "float64"]))
def test_norm_zero_size_is_zero(backend, dtype, ord):
    x = backend.asarray(np.zeros((3, 0)), dtype)
    _check_norm(backend, x, dtype, ord)  # 0-d zero
    _check_norm(backend, x, dtype, ord, axis=1)  # three zeros
    _check_norm(backend, x, dtype, ord, axis=0)  # shape (0,)
    _check_norm(backend, backend.asarray(np.zeros(0), dtype), dtype, ord)


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3], ids=str)
@pytest.mark.parametrize(
    ("backend", "dtype"), params(CPU, ["bfloat16", "float16", "float32", "float64"])
)
def test_norm_nan_and_inf_propagate(backend, dtype, ord):
    data = sample((4, 6), seed=4)
    data[1, 2] = np.nan
    data[2, 3] = np.inf
    data[3, 0] = -np.inf
    data[3, 1] = np.nan  # NaN beats inf in the same slice
    x = backend.asarray(data, dtype)
    whole = backend.to_numpy(fastclip.norm(x, ord))
    assert np.isnan(whole)
    rows = _check_norm(backend, x, dtype, ord, axis=1)
    rows = backend.to_numpy(rows)
    assert np.isfinite(rows[0]) and np.isnan(rows[1]) and rows[2] == np.inf and np.isnan(rows[3])
    cols = backend.to_numpy(_check_norm(backend, x, dtype, ord, axis=0))
    assert cols[0] == np.inf and np.isnan(cols[1]) and np.isnan(cols[2]) and cols[3] == np.inf


# ------------------------------------------------------------------ layouts


def _views(backend):
    base = sample((6, 8), seed=5)
    if backend.is_torch:
        t = backend.asarray(base, "float32")
        return {"strided": t[:, ::2], "transposed": t.T, "offset": t[1:, 3:]}
    a = np.array(base, np.float32)
    return {
        "strided": a[:, ::2],
        "transposed": a.T,
        "offset": a[1:, 3:],
        "fortran": np.asfortranarray(a),
        "reversed": a[::-1, ::-3],
    }


@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 1)], ids=str)
@pytest.mark.parametrize("backend", [Backend.NUMPY, Backend.TORCH], ids=str)
def test_norm_of_non_contiguous_views(backend, axis):
    for x in _views(backend).values():
        for ord in (1, 2, math.inf, 3):
            got = fastclip.norm(x, ord, axis=axis)
            expected = ref.norm(backend.to_numpy(x), ord, axis=axis)
            assert_close(backend.to_numpy(got), expected, "float32")


# ------------------------------------------------- multi-chunk / parallel paths


@pytest.mark.parametrize("n", [1, 6, 7, 8, 50, 4097 * 2 + 3])
@pytest.mark.parametrize("ord", [1, 2, math.inf, 3], ids=str)
@pytest.mark.parametrize(
    ("backend", "dtype"),
    params([Backend.NUMPY, Backend.TORCH], ["bfloat16", "float16", "float32", "float64"]),
)
def test_norm_small_chunks_parallel(small_chunks, backend, dtype, ord, n):
    x = backend.asarray(sample(n, seed=n), dtype)
    _check_norm(backend, x, dtype, ord)
    if n >= 8:
        x2 = backend.asarray(sample((n // 4, 4), seed=n), dtype)
        _check_norm(backend, x2, dtype, ord, axis=0)
        _check_norm(backend, x2, dtype, ord, axis=1)


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3], ids=str)
def test_norm_nan_in_last_chunk_propagates(small_chunks, ord):
    data = sample(100, seed=6)
    data[-1] = np.nan
    assert np.isnan(fastclip.norm(np.array(data, np.float32), ord))
    assert np.isnan(
        fastclip.global_norm([np.ones(30, np.float32), np.array(data, np.float32)], ord)
    )


# ------------------------------------------------------------------ accuracy


@pytest.mark.parametrize(
    "backend", [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT], ids=str
)
def test_norm_accuracy_1e7_float32(backend):
    rng = np.random.default_rng(7)
    data = rng.random(10_000_000, dtype=np.float32) + np.float32(0.5)  # no cancellation help
    x = backend.asarray(data, "float32") if not backend.is_numpy else data
    expected = np.sqrt(np.sum(data.astype(np.float64) ** 2))
    got = float(backend.to_numpy(fastclip.norm(x)))
    assert abs(got - expected) / expected < 1e-7
    got_global = float(backend.to_numpy(fastclip.global_norm([x[:3_000_001], x[3_000_001:]])))
    assert abs(got_global - expected) / expected < 1e-7


@pytest.mark.slow
def test_norm_accuracy_3e7_float32():
    rng = np.random.default_rng(8)
    data = rng.random(30_000_000, dtype=np.float32)
    expected = np.sqrt(np.sum(data.astype(np.float64) ** 2))
    for ord in (2, 1):
        exp = expected if ord == 2 else np.sum(data, dtype=np.float64)
        assert abs(float(fastclip.norm(data, ord)) - exp) / exp < 1e-7


@pytest.mark.parametrize("ord", [1, 2, 3, math.inf], ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["bfloat16", "float32"]))
def test_norm_of_huge_float32_values_is_finite(backend, dtype, ord):
    data = sample(5000, seed=9, scale=1e20)  # squares overflow float32
    x = backend.asarray(data, dtype)
    got = _check_norm(backend, x, dtype, ord)
    assert np.isfinite(backend.to_numpy(got))
    if backend.is_numpy or backend.is_torch:
        x2 = backend.asarray(data.reshape(50, 100), dtype)
        _check_norm(backend, x2, dtype, ord, axis=1)
        _check_norm(backend, x2, dtype, ord, axis=0)


def test_norm_of_huge_values_small_chunks(small_chunks):
    data = np.array(sample(100, seed=10, scale=1e20), np.float32)
    expected = ref.norm(data)
    assert_close(fastclip.norm(data), expected, "float32")
    assert_close(fastclip.global_norm([data[:50], data[50:]]), expected, "float32")


# --------------------------------------------------------------- global_norm


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3, 0.5], ids=str)
@pytest.mark.parametrize(
    "backend",
    [Backend.NUMPY, Backend.NUMPY_READONLY, Backend.TORCH, Backend.ARRAY_API_STRICT],
    ids=str,
)
def test_global_norm_mixed_dtypes(backend, ord):
    dtypes = [d for d in ("float16", "bfloat16", "float32") if d in backend.float_dtypes]
    arrays = [backend.asarray(sample((3, 4), seed=i), d) for i, d in enumerate(dtypes)]
    arrays.append(backend.asarray(np.zeros((0, 5)), "float32"))
    got = fastclip.global_norm(arrays, ord)
    expected = ref.global_norm([backend.to_numpy(a) for a in arrays], ord)
    backend.assert_array(got, arrays[0], "float32", ())
    assert_close(backend.to_numpy(got), expected, "float32")
    # any float64 array makes the result float64
    arrays.append(backend.asarray(sample(7, seed=11), "float64"))
    got = fastclip.global_norm(arrays, ord)
    backend.assert_array(got, arrays[0], "float64", ())
    expected = ref.global_norm([backend.to_numpy(a) for a in arrays], ord)
    assert_close(backend.to_numpy(got), expected, "float32")  # float32 parts limit it


@pytest.mark.parametrize("count", [1, 7, 8, 40])
@pytest.mark.parametrize("ord", [1, 2, math.inf, 3], ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["float32", "float64"]))
def test_global_norm_many_arrays(backend, dtype, ord, count):
    """>= 8 NumPy arrays take the bulk-header path, fewer the per-array path."""
    arrays = [backend.asarray(sample(i % 5 * 3, seed=i), dtype) for i in range(count)]
    got = fastclip.global_norm(arrays, ord)
    expected = ref.global_norm([backend.to_numpy(a) for a in arrays], ord)
    backend.assert_array(got, arrays[0], dtype, ())
    assert_close(backend.to_numpy(got), expected, dtype)


@pytest.mark.parametrize("ord", [1, 2, math.inf], ids=str)
def test_global_norm_many_arrays_small_chunks(small_chunks, ord):
    arrays = [np.array(sample(i * 5, seed=i), np.float32) for i in range(12)]
    arrays[3] = arrays[3][::2]  # one strided array: the slow path with a copy
    arrays_t = [np.array(sample(i * 5, seed=i), np.float32) for i in range(12)]
    for arrs in (arrays, arrays_t):
        assert_close(fastclip.global_norm(arrs, ord), ref.global_norm(arrs, ord), "float32")


def test_global_norm_empty_list_is_zero_like_torch():
    import torch

    got = fastclip.global_norm([])
    assert float(got) == 0.0 == float(torch.nn.utils.get_total_norm([]))
    assert got.shape == ()


@pytest.mark.parametrize("backend", CPU, ids=str)
def test_global_norm_accepts_one_array_and_generators(backend):
    arrays = [backend.asarray(sample(6, seed=i), "float32") for i in range(3)]
    expected = ref.global_norm([backend.to_numpy(a) for a in arrays])
    assert_close(backend.to_numpy(fastclip.global_norm(a for a in arrays)), expected, "float32")
    assert_close(backend.to_numpy(fastclip.global_norm(tuple(arrays))), expected, "float32")
    one = ref.norm(backend.to_numpy(arrays[0]))
    assert_close(backend.to_numpy(fastclip.global_norm(arrays[0])), one, "float32")


@pytest.mark.parametrize("ord", [1, 2, 3, math.inf], ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["float32"]))
def test_norm_of_tiny_float32_values_is_accurate(backend, dtype, ord):
    """The mirror of the overflow case: squares of |x| ~ 1e-25 underflow float32."""
    data = sample(5000, seed=12, scale=1e-25)
    x = backend.asarray(data, dtype)
    got = _check_norm(backend, x, dtype, ord)
    assert backend.to_numpy(got) > 0
    _check_norm(backend, backend.asarray(data.reshape(50, 100), dtype), dtype, ord, axis=1)
    expected = ref.global_norm([backend.to_numpy(x)] * 2, ord)
    assert_close(backend.to_numpy(fastclip.global_norm([x, x], ord)), expected, dtype)


@pytest.mark.parametrize("ord", [1, 2, 2.0, math.inf])
@pytest.mark.parametrize(
    "values",
    [
        np.linspace(-3, 5, 1_000),
        np.array([1e20, -3e19, 2.0]),  # squares overflow float32
        np.array([1e-30, -2e-31]),  # squares underflow float32
        np.array([1e200, -3e199, 1.0]),  # float64 squares overflow (inf in float32)
        np.array([1e-200, 2e-201]),  # float64 squares underflow (0 in float32)
        np.array([1.0, np.nan, 2.0]),
        np.array([1.0, -np.inf]),
        np.zeros(0),
        np.arange(12.0).reshape(3, 4),
    ],
    ids=["ramp", "huge", "tiny", "huge64", "tiny64", "nan", "inf", "empty", "2-d"],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_whole_array_fast_path_equals_the_general_path(values, ord, dtype):
    """``norm`` of a contiguous float32/float64 ndarray skips validation and
    dispatch; the general path (taken for an ``np.float64`` ord) must give the
    same bits, and both the float64 oracle's value."""
    with np.errstate(over="ignore"):  # 1e200 is inf in float32
        x = values.astype(dtype)
    fast = fastclip.norm(x, ord)
    general = fastclip.norm(x, np.float64(ord))
    assert type(fast) is np.ndarray and fast.dtype == x.dtype and fast.shape == ()
    np.testing.assert_array_equal(fast, general)
    rtol = 1e-6 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(fast, ref.norm(x, ord), rtol=rtol, equal_nan=True)
