"""Array-valued bounds of ``clip_by_value`` and ``clip_by_norm``: TensorFlow's tensor
``clip_value_min``/``clip_value_max`` and ``clip_norm`` (``clip_ops.py``: ``t * c /
max(||t||, c)``), against float64 NumPy transcriptions, on the backend matrix;
every bad bound raises before anything is written.
"""

from __future__ import annotations

import numpy as np
import pytest
from _backends import CPU, params
from hypothesis import given, settings
from hypothesis import strategies as st

import fastclip

RTOL = {"float32": 2e-6, "float64": 1e-12}


def tf_clip_by_norm(t: np.ndarray, clip_norm: np.ndarray, axes) -> np.ndarray:
    """TensorFlow's ``clip_by_norm`` (clip_ops.py) in float64: ``t * c / max(l2, c)``."""
    t = np.asarray(t, np.float64)
    l2 = np.sqrt(np.sum(t * t, axis=axes, keepdims=True))
    return t * clip_norm / np.maximum(l2, clip_norm)


@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ("bfloat16", "float32", "float64")))
@pytest.mark.parametrize(
    ("lo_shape", "hi_shape"), [((4, 5), (4, 5)), ((5,), None), ((4, 1), (1, 5)), (None, (5,))]
)
def test_clip_by_value_array_bounds_against_numpy(backend, dtype, lo_shape, hi_shape) -> None:
    rng = np.random.default_rng(4)
    data = rng.standard_normal((4, 5)) * 2
    data[0, 0] = np.nan
    lo = None if lo_shape is None else rng.uniform(-1.5, -0.2, lo_shape)
    hi = None if hi_shape is None else rng.uniform(0.2, 1.5, hi_shape)
    x = backend.asarray(data, dtype)
    xd = backend.round_to(data, dtype)
    want = np.clip(
        xd,
        -np.inf if lo is None else backend.round_to(lo, dtype),
        np.inf if hi is None else backend.round_to(hi, dtype),
    )
    blo = None if lo is None else backend.asarray(lo, "float64")
    bhi = None if hi is None else backend.asarray(hi, "float64")
    got = fastclip.clip_by_value(x, blo, bhi)
    backend.assert_array(got, x, dtype, (4, 5))
    np.testing.assert_array_equal(backend.to_numpy(got), want)  # NaN stays NaN
    if backend.writeable:
        assert fastclip.clip_by_value_(x, blo, bhi) is x
        np.testing.assert_array_equal(backend.to_numpy(x), want)


@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ("float32", "float64")))
@pytest.mark.parametrize(
    ("shape", "axis", "c_shape"),
    [((4, 5), 1, (4, 1)), ((4, 5), 0, (1, 5)), ((4, 5), 0, (5,)), ((3, 4, 5), (1, 2), (3, 1, 1))],
)
def test_clip_by_norm_array_bound_against_tensorflow(backend, dtype, shape, axis, c_shape) -> None:
    rng = np.random.default_rng(8)
    data = rng.standard_normal(shape) * rng.choice(
        [0.1, 1.0, 5.0], size=shape[:1] + (1,) * (len(shape) - 1)
    )
    c = rng.uniform(0.3, 3.0, c_shape)
    x = backend.asarray(data, dtype)
    cb = backend.asarray(c, "float64")
    xd = backend.round_to(data, dtype)
    axes = (axis,) if isinstance(axis, int) else axis
    want = tf_clip_by_norm(xd, c, axes)
    assert np.any(want != xd) and np.any(want == xd)  # some slices clipped, some kept
    got = fastclip.clip_by_norm(x, cb, axis=axis, eps=0.0)
    backend.assert_array(got, x, dtype, shape)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=RTOL[dtype], atol=0)
    if backend.writeable:
        norms = fastclip.clip_by_norm_(x, cb, axis=axis, eps=0.0)
        np.testing.assert_allclose(backend.to_numpy(x), want, rtol=RTOL[dtype], atol=0)
        exact = np.sqrt(np.sum(xd * xd, axis=axes))
        np.testing.assert_allclose(backend.to_numpy(norms), exact, rtol=RTOL[dtype])
    else:
        with pytest.raises(ValueError):
            fastclip.clip_by_norm_(x, cb, axis=axis)
        np.testing.assert_array_equal(backend.to_numpy(x), xd)


def test_clip_by_norm_array_bound_keeps_the_zero_norm_rule() -> None:
    x = np.array([[0.0, 0.0], [3.0, 4.0]])
    got = fastclip.clip_by_norm(x, np.array([[0.0], [1.0]]), axis=1, eps=0.0)
    # a zero slice with bound 0 (0/0) keeps factor 1, as the scalar routes do
    np.testing.assert_allclose(got, [[0.0, 0.0], [3.0 / 5.0, 4.0 / 5.0]], rtol=1e-15, atol=0)


BAD_VALUE_BOUNDS = [
    (np.zeros(3), None, ValueError, "does not broadcast"),
    (np.zeros((2, 4, 5)), None, ValueError, "does not broadcast"),  # would grow x
    (np.array([0.0, np.nan, 0, 0, 0]), None, ValueError, "NaN"),
    (np.ones(5), np.zeros(5), ValueError, "min must be <= max elementwise"),
    (np.zeros(5, bool), None, TypeError, "real"),
    (np.zeros((4, 5)), np.full(5, -1.0), ValueError, "<= max"),
]


@pytest.mark.parametrize(("lo", "hi", "exc", "match"), BAD_VALUE_BOUNDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_bad_value_bounds_raise_before_any_write(lo, hi, exc, match, inplace) -> None:
    x = np.random.default_rng(1).standard_normal((4, 5))
    before = x.copy()
    fn = fastclip.clip_by_value_ if inplace else fastclip.clip_by_value
    with pytest.raises(exc, match=match) as info:
        fn(x, lo, hi)
    assert f"fastclip.{fn.__name__}:" in str(info.value)
    np.testing.assert_array_equal(x, before)


def test_array_bounds_refuse_other_libraries_integers_and_lists() -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 5)
    before = t.clone()
    with pytest.raises(TypeError, match="never moves data"):
        fastclip.clip_by_value_(t, np.zeros(5), None)
    with pytest.raises(TypeError, match="never moves data"):
        fastclip.clip_by_norm_(t, np.ones((4, 1)), axis=1)
    torch.testing.assert_close(t, before, rtol=0, atol=0)
    with pytest.raises(TypeError, match="integer and bool"):
        fastclip.clip_by_value(np.arange(5), np.zeros(5), None)
    with pytest.raises(TypeError, match="one array"):
        fastclip.clip_by_value([np.ones(5)], np.zeros(5), None)
    with pytest.raises(ValueError, match=">= 0 everywhere"):
        fastclip.clip_by_norm_(t, torch.tensor([[1.0], [-1.0], [1.0], [1.0]]), axis=1)
    torch.testing.assert_close(t, before, rtol=0, atol=0)
    leaf = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        fastclip.clip_by_value_(leaf, torch.zeros(5), None)


def test_lists_are_not_array_bounds() -> None:
    """Only arrays are array-valued bounds (a list would be an implicit host-to-device
    copy for device arrays): a list bound stays the TypeError it always was."""
    x = np.array([[-2.0, 2.0], [0.5, -0.5]])
    with pytest.raises(TypeError, match="min"):
        fastclip.clip_by_value(x, [[-1.0, 0.0]], None)
    with pytest.raises(TypeError, match="max"):
        fastclip.clip_by_value(x, np.zeros(2), [1.0, 1.5])
    with pytest.raises(TypeError):
        fastclip.clip_by_norm(x, [1.0, 2.0], axis=1)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_array_value_bounds_property(shape, seed, dtype) -> None:
    """Any bound shape that broadcasts to x: exactly numpy.clip (TensorFlow's clip_by_value)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    bshape = [s if rng.random() < 0.5 else 1 for s in shape][rng.integers(0, len(shape)) :]
    lo = rng.uniform(-1, 0, bshape)
    hi = lo + rng.uniform(0, 1, bshape)
    if lo.size == 1:
        lo, hi = np.broadcast_to(lo, shape), np.broadcast_to(hi, shape)
    want = np.clip(x, lo.astype(dtype), hi.astype(dtype))
    np.testing.assert_array_equal(fastclip.clip_by_value(x, lo, hi), want)


def test_info_says_where_array_bounds_go() -> None:
    # no silent route: fastclip info names the path array-valued bounds take
    line = fastclip.info()["array_bounds"]
    assert "elementwise op of the array's own library" in line
    assert "array_bounds:" in fastclip._info.format_info(fastclip.info())


def test_nan_in_an_array_max_norm_names_max_norm_on_numpy_and_dask():
    x = np.ones((3, 4))
    bound = np.array([[1.0], [np.nan], [2.0]])
    with pytest.raises(ValueError, match=r"fastclip\.clip_by_norm: max_norm must not contain NaN"):
        fastclip.clip_by_norm(x, bound, axis=1)
    da = pytest.importorskip("dask.array")
    lazy = fastclip.clip_by_norm(da.from_array(x, chunks=2), da.from_array(bound), axis=1)
    with pytest.raises(ValueError, match=r"fastclip\.clip_by_norm: max_norm must not contain NaN"):
        lazy.compute()
