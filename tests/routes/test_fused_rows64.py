"""The CPU route's fused per-row clip of float64 data (``rows_clip_wide``,
``fastclip/_cpu/_axis_kernels.py``): bit for bit the result of the two-launch
path it replaces (``AxisPlan.norms``, ``coefficient_parts``, ``AxisPlan.scale``),
norms and data, on NumPy arrays and torch tensors, in place and out of place;
and within float64 rounding of the oracle ``tests/reference.py``.

What only this route does lives here: the values of ``clip_by_norm`` along an
axis on every backend are ``tests/api/test_clip_norm.py``'s.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import reference
from _backends import assert_close
from hypothesis import given
from hypothesis import strategies as st

import fastclip
from fastclip import _config
from fastclip._cpu import _axes

torch = pytest.importorskip("torch", reason="torch is not installed")

# Values that take every branch: zeros of both signs, NaN, inf, subnormal maxima
# (squares flush to 0), huge values (the L2 power sum overflows), tiny normal
# values (the power sum underflows below SAFE_LO), and ordinary numbers.
EDGES = [0.0, -0.0, 1.0, -2.5, 3.0, math.nan, math.inf, -math.inf, 1e-310, -1e-310]
EDGES += [1e200, -1e200, 1e300, -1e300, 1e-300, 1e-200, -1e-150, 7e-5, 123.25]
# max_norm 1e-300 against norms of 1e300: a coefficient of 1e-600, two factors.
MAX_NORMS = [1e-300, 1e-5, 1.0, 2.0, 1e300, 0.0]
ORDS = [1, 2, math.inf]


def _bits(a: Any) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(a, np.float64).view(np.uint64)


def _launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the kernels AxisPlan launches from now on."""
    names: list[str] = []
    real = _axes.run

    def spy(name: str, *args: Any) -> Any:
        names.append(name)
        return real(name, *args)

    monkeypatch.setattr(_axes, "run", spy)
    return names


def _clip(x: Any, max_norm: float, ord: float, axis: Any, inplace: bool) -> tuple[Any, Any]:
    """(data after, norms before or None) of clip_by_norm(_) on a copy of ``x``."""
    y = x.clone() if isinstance(x, torch.Tensor) else x.copy()
    if inplace:
        return y, fastclip.clip_by_norm_(y, max_norm, ord, axis=axis)
    return fastclip.clip_by_norm(y, max_norm, ord, axis=axis), None


def _check(x: np.ndarray, max_norm: float, ord: float, axis: Any) -> None:
    for lib in ("numpy", "torch"):
        xin = torch.from_numpy(x.copy()) if lib == "torch" else x
        for inplace in (True, False):
            with pytest.MonkeyPatch.context() as m:
                names = _launches(m)
                got, got_norms = _clip(xin, max_norm, ord, axis, inplace)
            assert "rows_clip_wide" in names and "rows_pow_sum" not in names, names
            with pytest.MonkeyPatch.context() as m:
                m.setattr(_axes.AxisPlan, "fused_clip", lambda *a, **k: None)
                names = _launches(m)
                want, want_norms = _clip(xin, max_norm, ord, axis, inplace)
            assert "rows_pow_sum" in names, names  # the two-launch path did run
            assert np.array_equal(_bits(got), _bits(want)), (lib, inplace, got, want)
            if inplace:  # the norms before, returned by the in-place call
                assert np.array_equal(_bits(got_norms), _bits(want_norms)), (got_norms, want_norms)
                assert_close(_np(got_norms), reference.norm(x, ord, axis=axis), "float64")
            assert_close(
                _np(got), reference.clip_by_norm(x, max_norm, ord, axis=axis), "float64", 4e-323
            )


def _np(a: Any) -> np.ndarray:
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("max_norm", MAX_NORMS)
def test_edge_rows_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, ord: float, max_norm: float
) -> None:
    rows = [[v, 0.5 * v, 0.0] for v in EDGES] + [[1e200] * 3, [1e-310] * 3, [0.0] * 3]
    rows += [[1e300, -1e300, 1e299], [1e-300, 2e-300, -3e-300], [math.nan, 1e200, 1.0]]
    _check(np.array(rows, np.float64), max_norm, ord, 1)


@given(
    rows=st.lists(
        st.lists(st.sampled_from(EDGES) | st.floats(-1e3, 1e3), min_size=1, max_size=6),
        min_size=1,
        max_size=5,
    ),
    max_norm=st.sampled_from(MAX_NORMS),
    ord=st.sampled_from(ORDS),
)
def test_fused_matches_two_launches(rows: list[list[float]], max_norm: float, ord: float) -> None:
    k = min(len(r) for r in rows)
    x = np.array([r[:k] for r in rows], np.float64)
    _check(x, max_norm, ord, -1)


@pytest.mark.parametrize("ord", ORDS)
def test_parallel_twin_and_trailing_axes(monkeypatch: pytest.MonkeyPatch, ord: float) -> None:
    """The ``prange`` twin over many rows, reduced over two trailing axes."""
    monkeypatch.setattr(_config, "PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(_config, "THREADS", "parallel")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 5, 40))
    x[::7] *= 1e200  # power sums overflow
    x[1::9] *= 1e-310  # subnormal maxima
    x[2::11] = 0.0
    x[3::13, 1, 4] = math.nan
    x[4::17] = rng.standard_normal((4, 5, 40)) * 1e300
    _check(x, 1e-300, ord, (1, 2))
    _check(x, 3.0, ord, (1, 2))
