"""Coefficients beyond float64's range, applied as two factors (``coefficient_parts``).

``num / (norm + eps)`` rounded to one float64 factor flushes to 0 below
2**-1074 and overflows above 2**1024, although the scaled data are
representable: float64 data of norm 1e300 clipped to 1e-300 came out 0, and
data of subnormal norm normalised came out NaN and inf (found by the contract
fuzzer, ``tests/api/test_fuzz.py``).  The expected values here are exact
rationals (``fractions.Fraction`` of the float64 inputs and of the float64
oracle's norm) rounded once to float64, so they do not share the code's split.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import reference as ref
from _backends import WRITEABLE, Backend, backend_params

import fastclip
from fastclip import _formulas

ORDS = (1, 2, math.inf, 3)


def _exact(x: np.ndarray, num: float, den: float) -> np.ndarray:
    """x * num / den, every element rounded once to float64."""
    q = Fraction(num) / Fraction(den)
    return np.array([float(Fraction(float(v)) * q) for v in x.reshape(-1)]).reshape(x.shape)


# (name, data, max_norm or None for normalize): quotients beyond 2**+-1000
CASES = [
    ("clip 1e300 to 1e-300", [1e300, -2e300, 3e299], 1e-300),
    ("clip 1e200 to 1e-200", [5e200, 1e200], 1e-200),
    ("normalize subnormal", [0.0, 1e-310, -2e-310], None),
    ("normalize smallest subnormals", [5e-324, 1e-323], None),
    ("normalize near float64's max", [6e307, -8e307], None),
]
IDS = [c[0] for c in CASES]


def _want(data: list[float], c: float | None, ord: float) -> np.ndarray:
    x = np.asarray(data, np.float64)
    n = float(ref.norm(x, ord))
    if c is not None and c >= n:
        return x.copy()
    return _exact(x, 1.0 if c is None else c, n)


def _call(x, c, ord, axis=None, inplace=False):
    kw = {"ord": ord, "eps": 0.0, "axis": axis}
    if c is None:
        return (fastclip.normalize_ if inplace else fastclip.normalize)(x, **kw)
    return (fastclip.clip_by_norm_ if inplace else fastclip.clip_by_norm)(x, c, **kw)


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=2e-323)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize(("name", "data", "c"), CASES, ids=IDS)
def test_whole_array(backend: Backend, name, data, c, ord):
    want = _want(data, c, ord)
    x = backend.asarray(np.asarray(data), "float64")
    _close(backend.to_numpy(_call(x, c, ord)), want)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize(("name", "data", "c"), CASES, ids=IDS)
def test_per_slice_rows_and_columns(backend: Backend, name, data, c, ord):
    """Row 0 needs two factors, row 1 (ordinary data) one: both in one call."""
    want0 = _want(data, c, ord)
    other = np.asarray([3.0, 4.0, 12.0][: len(data)])
    want1 = _want(list(other), c, ord) if c is None or c < float(ref.norm(other, ord)) else other
    rows = np.stack([np.asarray(data), other])
    got = backend.to_numpy(_call(backend.asarray(rows, "float64"), c, ord, axis=1))
    _close(got[0], want0)
    _close(got[1], want1)
    got_t = backend.to_numpy(_call(backend.asarray(rows.T.copy(), "float64"), c, ord, axis=0))
    _close(got_t[:, 0], want0)


@pytest.mark.parametrize("ord", (1, 2, math.inf))
@pytest.mark.parametrize("backend", backend_params(WRITEABLE))
def test_in_place_and_global(backend: Backend, ord):
    data, c = [1e300, -2e300, 3e299], 1e-300
    want = _want(data, c, ord)
    x = backend.asarray(np.asarray(data), "float64")
    _call(x, c, ord, inplace=True)
    _close(backend.to_numpy(x), want)
    # two arrays, strided second: the packed route's two scale passes
    a = backend.asarray(np.asarray(data[:2]), "float64")
    b_base = backend.asarray(np.asarray([data[2], 0.0, 1e299, 0.0]), "float64")
    b = b_base[::2]
    total = float(ref.global_norm([np.asarray(data[:2]), np.asarray([data[2], 1e299])], ord))
    outs, _ = fastclip.clip_by_global_norm([a, b], c, ord=ord, eps=0.0)
    _close(backend.to_numpy(outs[0]), _exact(np.asarray(data[:2]), c, total))
    fastclip.clip_by_global_norm_([a, b], c, ord=ord, eps=0.0)
    _close(backend.to_numpy(a), _exact(np.asarray(data[:2]), c, total))
    _close(backend.to_numpy(b), _exact(np.asarray([data[2], 1e299]), c, total))
    assert float(backend.to_numpy(b_base)[1]) == 0.0  # the gaps are not written


@pytest.mark.parametrize(("name", "data", "c"), CASES, ids=IDS)
def test_dask_route(name, data, c):
    da = pytest.importorskip("dask.array")
    want = _want(data, c, 2)
    x = da.from_array(np.asarray(data), chunks=1)
    _close(_call(x, c, 2).compute(), want)
    rows = da.from_array(np.stack([np.asarray(data)] * 2), chunks=1)
    _close(_call(rows, c, 2, axis=1).compute()[1], want)
    if c is not None:
        outs, _ = fastclip.clip_by_global_norm([x], c, eps=0.0)
        _close(outs[0].compute(), want)


def test_jax_without_x64_float32():
    """JAX computes in float32 without x64: its power sums overflow at 3e38 and its
    coefficients flush below 1e-38, so both are rescaled / split in float32."""
    jnp = pytest.importorskip("jax.numpy")
    import jax

    if jax.config.jax_enable_x64:
        pytest.skip("x64 is enabled in this process: the float32-only case is not reachable")
    x = jnp.asarray([1e30, -2e30], dtype=jnp.float32)
    n = float(ref.norm(np.asarray([1e30, -2e30], np.float32)))
    np.testing.assert_allclose(float(fastclip.norm(x)), n, rtol=1e-6)
    want = _exact(np.asarray([1e30, -2e30], np.float32).astype(np.float64), 1e-30, n)
    got = np.asarray(fastclip.clip_by_norm(x, 1e-30, eps=0.0), np.float64)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)
    outs, total = fastclip.clip_by_global_norm([x], 1e-30, eps=0.0)
    np.testing.assert_allclose(float(total), n, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(outs[0], np.float64), want, rtol=1e-6)


def _rel(a: Fraction, b: Fraction) -> float:
    return float(abs(a / b - 1))


def test_parts_multiply_to_the_quotient_and_are_one_in_range():
    norms = np.array([1e300, 2.0, 0.0, np.nan, np.inf, 1e-310])
    c, c2 = _formulas.coefficient_parts(norms, 1e-300, 0.0, "clip")
    base = _formulas.clip_coefficients(norms, 1e-300, 0.0, "clip")
    assert c2[0] != 1.0 and np.all(c2[1:] == 1.0)
    np.testing.assert_array_equal(c[1:], base[1:])
    product = Fraction(float(c[0])) * Fraction(float(c2[0]))
    assert _rel(product, Fraction(1e-300) / Fraction(1e300)) < 1e-15
    c, c2 = _formulas.coefficient_parts(norms, 1.0, 0.0, "normalize")
    assert c2[5] == 2.0**1000 and math.isfinite(float(c[5]))
    assert np.all(c2[:5] == 1.0)
    product = Fraction(float(c[5])) * Fraction(float(c2[5]))
    assert _rel(product, 1 / Fraction(1e-310)) < 1e-15


_EDGE_NORMS = [0.0, 1e-320, 1e-310, 1e-300, 1e-5, 1.0, 1e200, 1e300, 1.7e308, np.inf, np.nan]


@pytest.mark.parametrize("mode", ["clip", "normalize"])
@pytest.mark.parametrize("max_norm", [0.0, 1e-300, 1e-5, 1.0, 1e300, np.inf, np.nan], ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-6], ids=str)
def test_numpy_shortcut_equals_the_masks(mode, max_norm, eps):
    """NumPy norms with a scalar bound skip the masks when two reductions show no
    quotient leaves the range; on every pair of edge norms that gives the masks'
    factors (checked against the branch-free form, taken for any other namespace),
    and the exact quotient where one factor would leave float64's range."""
    xps = pytest.importorskip("array_api_strict")
    for i, a in enumerate(_EDGE_NORMS):
        for b in _EDGE_NORMS[i:]:
            norms = np.array([a, b])
            fast = _formulas.coefficient_parts(norms, max_norm, eps, mode)
            masks = _formulas.coefficient_parts(xps.asarray(norms), max_norm, eps, mode, xp=xps)
            for got, want in zip(fast, masks):
                np.testing.assert_array_equal(got, np.asarray(want), err_msg=str((a, b)))
            if not math.isfinite(max_norm):
                continue
            num = Fraction(1) if mode == "normalize" else Fraction(max_norm)
            for k, n in enumerate((a, b)):
                den = Fraction(n) + Fraction(eps) if math.isfinite(n) else Fraction(0)
                if den and num and (mode == "normalize" or num < den):
                    product = Fraction(float(fast[0][k])) * Fraction(float(fast[1][k]))
                    assert _rel(product, num / den) < 1e-15, (a, b, k)
