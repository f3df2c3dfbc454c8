"""Hypothesis strategies and checks shared by the contract fuzzers
(``tests/api/test_fuzz.py`` and ``tests/api/test_fuzz_steps.py``).

``values`` draws float64 data over magnitudes from subnormal to 1e300 with
the occasional special value; ``assert_matches`` compares a result with the
float64 oracle rounded to the result's dtype; ``snapshot`` takes the bytes
that a call must not change.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

import fastclip

#: What a refusal may raise: a clear error of the argument kind.
REFUSALS = (TypeError, ValueError)

MAGNITUDE = st.sampled_from([1.0, 1.0, 1.0, 1e-3, 1e30, 1e200, 1e-200, 1e-310, 1e-40])
SPECIAL = st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 65504.0, 3e38])


@st.composite
def values(draw: Any, n: int) -> np.ndarray:
    scale = draw(MAGNITUDE)
    base = draw(st.lists(st.floats(-4, 4, allow_nan=False), min_size=n, max_size=n))
    v = np.asarray(base, np.float64) * scale
    if n and draw(st.integers(0, 5)) == 0:
        v[draw(st.integers(0, n - 1))] = draw(SPECIAL)
    return v


def snapshot(owners: list[Any]) -> list[bytes]:
    return [np.asarray(o).tobytes() for o in owners]


def as64(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind == "c":
        return a.astype(np.complex128)
    return a.astype(np.float64)


def assert_matches(
    got: Any,
    want64: np.ndarray,
    dtype: np.dtype,
    rtol: float | None = None,
    atol_in_subnormals: float = 4.0,
) -> None:
    """``got`` (in ``dtype``) equals the float64 reference rounded to ``dtype``
    (within ``dtype``'s tolerance, or ``rtol``; absolutely within
    ``atol_in_subnormals`` times ``dtype``'s smallest subnormal)."""
    got = np.asarray(got)
    assert got.shape == np.shape(want64), (got.shape, np.shape(want64))
    with np.errstate(all="ignore"):
        want = np.asarray(want64).astype(dtype).astype(as64(got).dtype)
    g = as64(got)
    if dtype.kind in "biu":
        np.testing.assert_array_equal(g, want)
        return
    real = np.dtype(dtype.char.lower() if dtype.kind == "c" else dtype)
    tiny = float(np.finfo(np.float16 if real.itemsize == 2 else real).smallest_subnormal)
    if rtol is None:
        rtol = {2: 2e-2, 4: 3e-5, 8: 1e-10}.get(real.itemsize, 1e-10)
    np.testing.assert_allclose(g, want, rtol=rtol, atol=atol_in_subnormals * tiny, equal_nan=True)


def call(fn: Any, *args: Any, **kw: Any) -> tuple[Any, BaseException | None]:
    try:
        return fn(*args, **kw), None
    except REFUSALS as exc:
        return None, exc


def refuse_nonfinite_only_if(nonfinite: bool, fn: Any) -> Any:
    """``fn``, with a ``NonFiniteNormError`` turned into a refusal when the reference
    norm is non-finite too (``nonfinite="error"``), and left to fail the test otherwise."""

    def call(*args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except fastclip.NonFiniteNormError as exc:
            if nonfinite:
                raise ValueError(str(exc)) from exc
            raise

    return call
