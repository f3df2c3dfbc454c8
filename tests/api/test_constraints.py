"""``fastclip.constraints`` against float64 NumPy transcriptions of Keras 3's constraints.

Keras is not installed here; the oracles below are Keras' ``__call__`` bodies
(``keras/src/constraints/constraints.py``) with ``ops`` read as NumPy and
``backend.epsilon()`` as its default 1e-7, in float64.  fastclip's norms are
accumulated in float64 blocks, so float32 results agree with the oracle to a
few float32 ulps; float64 to ~1e-13.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _backends import CPU, Backend, params
from hypothesis import given, settings
from hypothesis import strategies as st

import fastclip
from fastclip.constraints import (
    Constraint,
    MaxNorm,
    MinMaxNorm,
    NonNeg,
    UnitNorm,
    deserialize,
    get,
    serialize,
)

#: keras.backend.epsilon()'s default (keras/src/backend/config.py), the oracles' own copy
KERAS_EPSILON = 1e-7

RTOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 3e-7, "float64": 1e-13}


def _norms(w: np.ndarray, axis) -> np.ndarray:
    ax = tuple(axis) if isinstance(axis, list) else axis
    return np.sqrt(np.sum(np.square(w), axis=ax, keepdims=True))


def keras_max_norm(w, max_value, axis):
    norms = _norms(w, axis)
    desired = np.clip(norms, 0, max_value)
    return w * (desired / (KERAS_EPSILON + norms))


def keras_min_max_norm(w, min_value, max_value, rate, axis):
    norms = _norms(w, axis)
    desired = rate * np.clip(norms, min_value, max_value) + (1 - rate) * norms
    return w * (desired / (KERAS_EPSILON + norms))


def keras_unit_norm(w, axis):
    return w / (KERAS_EPSILON + _norms(w, axis))


def keras_non_neg(w):
    return w * (w >= 0.0)


def _weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    # unit norms spread over two decades around the bounds used below, one zero unit
    w = rng.standard_normal(shape) * rng.choice([0.05, 0.3, 1.0, 4.0], size=shape[-1:])
    w[..., 0] = 0.0
    return w


CASES = [
    ((6, 5), 0),  # Dense kernel [in, out]: one norm per output unit
    ((3, 3, 4, 5), [0, 1, 2]),  # HWIO conv kernel: one per filter
    ((6, 5), -1),
    ((6, 5), None),  # the whole array
    ((7,), 0),  # bias
]


@pytest.mark.parametrize(("backend", "dtype"), params(CPU))
@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_norm_constraints_against_keras(backend: Backend, dtype: str, shape, axis) -> None:
    data = _weights(shape)
    w = backend.asarray(data, dtype)
    wd = backend.round_to(data, dtype)
    checks = [
        (MaxNorm(1.0, axis=axis), keras_max_norm(wd, 1.0, axis)),
        (MinMaxNorm(0.5, 2.0, axis=axis), keras_min_max_norm(wd, 0.5, 2.0, 1.0, axis)),
        (MinMaxNorm(0.5, 2.0, 0.3, axis=axis), keras_min_max_norm(wd, 0.5, 2.0, 0.3, axis)),
        (UnitNorm(axis=axis), keras_unit_norm(wd, axis)),
    ]
    for c, want in checks:
        got = c(w)
        backend.assert_array(got, w, dtype, shape)
        # the result is rounded once to dtype: compare at dtype's resolution
        np.testing.assert_allclose(
            backend.to_numpy(got), backend.round_to(want, dtype), rtol=RTOL[dtype], atol=0
        )
    np.testing.assert_array_equal(backend.to_numpy(w), wd)  # pure: w untouched


@pytest.mark.parametrize(("backend", "dtype"), params(CPU))
def test_non_neg_against_keras(backend: Backend, dtype: str) -> None:
    data = np.array([-2.0, -0.0, 0.0, 1e-3, 3.0, np.nan, np.inf])
    w = backend.asarray(data, dtype)
    got = backend.to_numpy(NonNeg()(w))
    np.testing.assert_array_equal(got, keras_non_neg(backend.round_to(data, dtype)))


def test_non_neg_documented_difference_at_minus_inf() -> None:
    """Keras' ``w * (w >= 0)`` gives NaN for -inf (``-inf * 0``); fastclip gives 0."""
    w = np.array([-np.inf])
    with np.errstate(invalid="ignore"):
        assert np.isnan(keras_non_neg(w)[0])
    assert NonNeg()(w)[0] == 0.0


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    lo=st.floats(0.0, 2.0),
    width=st.floats(0.0, 3.0),
    rate=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_min_max_norm_property(rows, cols, lo, width, rate, seed) -> None:
    w = _weights((rows, cols), seed)
    c = MinMaxNorm(lo, lo + width, rate, axis=0)
    want = keras_min_max_norm(w, lo, lo + width, rate, 0)
    np.testing.assert_allclose(c(w), want, rtol=1e-12, atol=1e-300)
    # with rate 1 every non-zero unit lands in [lo, hi] (up to eps / norm)
    if rate == 1.0:
        n = np.linalg.norm(c(w), axis=0)[1:]
        assert np.all(n <= (lo + width) * (1 + 1e-9)) and np.all(n >= lo * (1 - 1e-5))


def test_torch_weights_update_in_place_under_no_grad() -> None:
    torch = pytest.importorskip("torch")
    w = torch.tensor(_weights((6, 5)), dtype=torch.float32, requires_grad=True)
    want = keras_max_norm(w.detach().double().numpy(), 1.0, 0)
    with torch.no_grad():
        w.copy_(MaxNorm(1.0)(w))
    np.testing.assert_allclose(w.detach().double().numpy(), want, rtol=3e-7, atol=0)


# ----------------------------------------------------------- serialisation

ALL = [
    MaxNorm(),
    MaxNorm(3.5, axis=[0, 1, 2]),
    MinMaxNorm(),
    MinMaxNorm(0.25, 4.0, rate=0.5, axis=None),
    UnitNorm(axis=-1),
    NonNeg(),
]

#: Keras 3's defaults: MaxNorm(max_value=2, axis=0), MinMaxNorm(0.0, 1.0, 1.0, 0), UnitNorm(0).
KERAS_DEFAULTS = {
    "MaxNorm": {"max_value": 2.0, "axis": 0},
    "MinMaxNorm": {"min_value": 0.0, "max_value": 1.0, "rate": 1.0, "axis": 0},
    "UnitNorm": {"axis": 0},
    "NonNeg": {},
}


@pytest.mark.parametrize("c", ALL, ids=repr)
def test_config_round_trips_through_json(c: Constraint) -> None:
    config = json.loads(json.dumps(c.get_config()))
    again = type(c).from_config(config)
    assert again == c and again.get_config() == c.get_config()
    d = json.loads(json.dumps(serialize(c)))
    assert d["class_name"] == type(c).__name__
    assert deserialize(d) == c and get(d) == c
    w = _weights((3, 3, 4, 5))
    np.testing.assert_array_equal(deserialize(d)(w), c(w))


def test_defaults_and_aliases_are_keras_ones() -> None:
    for name, config in KERAS_DEFAULTS.items():
        assert get(name).get_config() == config
    assert get("max_norm") == MaxNorm() and get("min_max_norm") == MinMaxNorm()
    assert get("unit_norm") == UnitNorm() and get("non_neg") == NonNeg()
    assert get(None) is None
    c = MaxNorm()
    assert get(c) is c
    assert fastclip.constraints.MaxNorm is MaxNorm


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: MaxNorm(-1.0), ValueError, "max_value"),
        (lambda: MaxNorm(math.nan), ValueError, "max_value"),
        (lambda: MaxNorm(True), TypeError, "max_value"),
        (lambda: MinMaxNorm(2.0, 1.0), ValueError, "max_value"),
        (lambda: MinMaxNorm(rate=1.5), ValueError, "rate"),
        (lambda: UnitNorm(axis=1.5), TypeError, "axis"),
        (lambda: deserialize({"class_name": "RadialConstraint"}), ValueError, "unknown"),
        (lambda: deserialize([1]), ValueError, "class_name"),
        (lambda: get(3), TypeError, "cannot interpret"),
        (lambda: serialize("MaxNorm"), TypeError, "Constraint"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, exc, match) -> None:
    with pytest.raises(exc, match=match) as info:
        make()
    assert "fastclip.constraints." in str(info.value)


def test_bad_axis_raises_before_anything() -> None:
    w = _weights((4, 3))
    before = w.copy()
    with pytest.raises(Exception, match="axis"):
        MaxNorm(1.0, axis=5)(w)
    np.testing.assert_array_equal(w, before)
