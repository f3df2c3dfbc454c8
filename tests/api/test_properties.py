"""Hypothesis properties of norms and clipping (NumPy route, float32 and float64).

This file owns the algebraic properties that tie the operations together (bounded,
idempotent, exact under the threshold, NaN-propagating, homogeneous, global = one
coefficient); each operation's examples are in its own test_<op>.py.

The profile (deterministic, modest example counts) is loaded in conftest.py.
"""

from __future__ import annotations

import math

import numpy as np
import reference as ref
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastclip

ORDS = st.sampled_from([1, 2, math.inf, 3, 0.5, 1.5])
DTYPES = st.sampled_from([np.float32, np.float64])


@st.composite
def arrays(draw, max_dims=3, max_side=9, bound=1e4):
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=1, max_side=max_side))
    elements = st.floats(
        -bound, bound, width=np.dtype(dtype).itemsize * 8, allow_nan=False, allow_subnormal=False
    )
    return draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def axes_for(draw, x):
    if draw(st.booleans()):
        return None
    axes = draw(st.lists(st.integers(0, x.ndim - 1), min_size=1, max_size=x.ndim, unique=True))
    return tuple(axes) if len(axes) > 1 else axes[0]


def _rtol(x):
    return 1e-12 if x.dtype == np.float64 else 1e-6


@given(x=arrays(), ord=ORDS, max_norm=st.floats(0.0, 1e3), data=st.data())
def test_clipped_norm_is_at_most_max_norm(x, ord, max_norm, data):
    axis = data.draw(axes_for(x))
    out = fastclip.clip_by_norm(x, max_norm, ord, axis=axis)
    norms = ref.norm(out, ord, axis=axis)
    assert np.all(norms <= max_norm * (1 + 1e-5) + 1e-30)
    np.testing.assert_allclose(
        out, ref.clip_by_norm(x, max_norm, ord, axis=axis), rtol=_rtol(x), atol=1e-30
    )


@given(x=arrays(), ord=ORDS, margin=st.floats(1e-4, 10.0), data=st.data())
def test_under_the_threshold_output_equals_input_exactly(x, ord, margin, data):
    """norm + eps <= max_norm: the coefficient is exactly 1, so nothing changes at all."""
    axis = data.draw(axes_for(x))
    max_norm = (float(np.max(ref.norm(x, ord, axis=axis))) + 1e-6) * (1 + margin)
    np.testing.assert_array_equal(fastclip.clip_by_norm(x, max_norm, ord, axis=axis), x)
    y = x.copy()
    fastclip.clip_by_norm_(y, max_norm, ord, axis=axis)
    np.testing.assert_array_equal(y, x)
    outs, _ = fastclip.clip_by_global_norm([x, x[..., :1]], max_norm * 2, ord)
    if ref.global_norm([x, x[..., :1]], ord) + 1e-6 < max_norm * 2:
        np.testing.assert_array_equal(outs[0], x)


@given(x=arrays(), ord=ORDS, max_norm=st.floats(0.1, 1e3), data=st.data())
def test_clipping_twice_is_clipping_once(x, ord, max_norm, data):
    axis = data.draw(axes_for(x))
    once = fastclip.clip_by_norm(x, max_norm, ord, axis=axis)
    twice = fastclip.clip_by_norm(once, max_norm, ord, axis=axis)
    # The second pass can only move values by about eps / max_norm (plus rounding).
    np.testing.assert_allclose(twice, once, rtol=2e-6 + 1e-6 / max_norm * 2, atol=1e-30)


@given(x=arrays(), ord=ORDS, index=st.integers(0, 10**6), data=st.data())
def test_nan_propagates(x, ord, index, data):
    x = x.copy()
    flat = x.reshape(-1)
    flat[index % flat.size] = np.nan
    assert np.isnan(fastclip.norm(x, ord))
    assert np.isnan(fastclip.clip_by_norm(x, 1.0, ord)).all()
    assert np.isnan(fastclip.normalize(x, ord)).all()
    outs, total = fastclip.clip_by_global_norm([x, np.ones(3, x.dtype)], 1.0, ord)
    assert np.isnan(total) and all(np.isnan(o).all() for o in outs)
    assert np.isnan(fastclip.clip_by_value(x, -1, 1).reshape(-1)[index % flat.size])


@given(
    xs=st.lists(arrays(max_dims=2), min_size=1, max_size=10),
    ord=ORDS,
    max_norm=st.floats(0.0, 1e3),
)
def test_global_clip_is_per_array_clip_with_one_coefficient(xs, ord, max_norm):
    assume(len({x.dtype for x in xs}) == 1)
    outs, total = fastclip.clip_by_global_norm(xs, max_norm, ord)
    np.testing.assert_allclose(float(total), ref.global_norm(xs, ord), rtol=_rtol(xs[0]))
    coef = ref.coefficient(
        float(total), max_norm, 1e-6
    )  # the coefficient fastclip's own norm implies
    for x, o in zip(xs, outs):
        np.testing.assert_allclose(o, x * coef, rtol=_rtol(x), atol=1e-30)
    # same as clipping the concatenation by its norm
    flat = fastclip.clip_by_norm(np.concatenate([x.reshape(-1) for x in xs]), max_norm, ord)
    np.testing.assert_allclose(
        np.concatenate([o.reshape(-1) for o in outs]), flat, rtol=_rtol(xs[0]), atol=1e-30
    )


@given(
    x=arrays(bound=1e3), ord=ORDS, k=st.integers(-20, 20), a=st.floats(-1e3, 1e3), data=st.data()
)
def test_norm_is_homogeneous(x, ord, k, a, data):
    axis = data.draw(axes_for(x))
    n = np.asarray(fastclip.norm(x, ord, axis=axis))
    # Scaling by a power of two is exact, and so is every step of the norm after it.
    scaled = fastclip.norm(x * x.dtype.type(2.0**k), ord, axis=axis)
    np.testing.assert_allclose(scaled, n * 2.0**k, rtol=_rtol(x))
    assume(a != 0 and abs(a) > 1e-3)
    y = (x.astype(np.float64) * a).astype(x.dtype)
    np.testing.assert_allclose(
        fastclip.norm(y, ord, axis=axis), ref.norm(y, ord, axis=axis), rtol=_rtol(x)
    )
    np.testing.assert_allclose(
        ref.norm(y, ord, axis=axis), abs(a) * ref.norm(x, ord, axis=axis), rtol=_rtol(x) * 2
    )
