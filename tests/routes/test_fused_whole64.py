"""The CPU route's fused float64 clips of a whole array (``arr_clip_wide``) and of
a list of one float64 table (``tab_clip_wide``, ``fastclip/_cpu/_kernels.py``):
bit for bit the two launches they replace (``_flat_norm`` / ``Packed.norm``, then
the scaling by ``coefficient_parts``), norms and data, on NumPy arrays and torch
tensors; and within float64 rounding of ``tests/reference.py``.

The per-row kernel is ``test_fused_rows64.py``'s; the values of
``clip_by_norm`` and ``clip_by_global_norm`` on every backend are
``tests/api``'s.
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
from fastclip._cpu import _core

torch = pytest.importorskip("torch", reason="torch is not installed")

# As test_fused_rows64.EDGES: zeros, NaN, inf, subnormal maxima, huge values (the
# L2 power sum overflows), tiny ones (it underflows), ordinary numbers.
EDGES = [0.0, -0.0, 1.0, -2.5, 3.0, math.nan, math.inf, -math.inf, 1e-310, -1e-310]
EDGES += [1e200, -1e200, 1e300, -1e300, 1e-300, 1e-200, -1e-150, 7e-5, 123.25]
MAX_NORMS = [1e-300, 1e-5, 1.0, 2.0, 1e300, 0.0]  # 1e-300 / 1e300: two factors
ORDS = [1, 2, math.inf]


def _bits(a: Any) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(a, np.float64).view(np.uint64)


def _np(a: Any) -> np.ndarray:
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _spy(m: pytest.MonkeyPatch) -> list[str]:
    names: list[str] = []
    real = _core.run

    def spy(name: str, *args: Any) -> Any:
        names.append(name)
        return real(name, *args)

    m.setattr(_core, "run", spy)
    return names


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x.copy()


def _whole(x: Any, max_norm: float, ord: float, inplace: bool) -> tuple[Any, Any]:
    y = _copy(x)
    if inplace:
        return y, fastclip.clip_by_norm_(y, max_norm, ord)
    return fastclip.clip_by_norm(y, max_norm, ord), None


def _listed(xs: list[Any], max_norm: float, ord: float) -> tuple[list[Any], Any]:
    ys = [_copy(x) for x in xs]
    return ys, fastclip.clip_by_global_norm_(ys, max_norm, ord)


def _same(got: Any, want: Any) -> None:
    assert np.array_equal(_bits(got), _bits(want)), (got, want)


def _check_whole(x: np.ndarray, max_norm: float, ord: float) -> None:
    for xin in (x, torch.from_numpy(x.copy())):
        for inplace in (True, False):
            with pytest.MonkeyPatch.context() as m:
                names = _spy(m)
                got, got_norm = _whole(xin, max_norm, ord, inplace)
            assert "arr_clip_wide" in names and "arr_pow_sum" not in names, names
            with pytest.MonkeyPatch.context() as m:
                m.setattr(_core, "_whole_wide", lambda *a: None)
                names = _spy(m)
                want, want_norm = _whole(xin, max_norm, ord, inplace)
            assert "arr_pow_sum" in names, names  # the two launches did run
            _same(got, want)
            if inplace:
                _same(got_norm, want_norm)
                assert_close(_np(got_norm), reference.norm(x, ord), "float64")
            assert_close(_np(got), reference.clip_by_norm(x, max_norm, ord), "float64", 4e-323)


def _check_listed(parts: list[np.ndarray], max_norm: float, ord: float) -> None:
    for xs in (parts, [torch.from_numpy(p.copy()) for p in parts]):
        with pytest.MonkeyPatch.context() as m:
            names = _spy(m)
            got, got_norm = _listed(xs, max_norm, ord)
        assert "tab_clip_wide" in names and "tab_pow_sum" not in names, names
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_core, "_table_wide", lambda *a: None)
            want, want_norm = _listed(xs, max_norm, ord)
        _same(got_norm, want_norm)
        for g, w in zip(got, want):
            _same(g, w)
        assert_close(_np(got_norm), reference.global_norm(parts, ord), "float64")
        expected = reference.clip_by_norm(np.concatenate(parts), max_norm, ord)
        assert_close(np.concatenate([_np(g) for g in got]), expected, "float64", 4e-323)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("max_norm", MAX_NORMS)
def test_edge_arrays_bit_for_bit(ord: float, max_norm: float) -> None:
    for values in ([1e200] * 3, [1e-310, -1e-310], [0.0] * 4, [1e300, -1e300, 1e299]):
        for extra in ([], [math.nan], [math.inf], [1.0]):
            x = np.array(values + extra, np.float64)
            _check_whole(x.reshape(-1, 1) if len(x) % 2 else x.reshape(2, -1), max_norm, ord)
            _check_listed([x[:1], x[1:]], max_norm, ord)


@given(
    values=st.lists(st.sampled_from(EDGES) | st.floats(-1e3, 1e3), min_size=1, max_size=9),
    cut=st.integers(0, 9),
    max_norm=st.sampled_from(MAX_NORMS),
    ord=st.sampled_from(ORDS),
)
def test_fused_matches_two_launches(
    values: list[float], cut: int, max_norm: float, ord: float
) -> None:
    x = np.array(values, np.float64)
    _check_whole(x, max_norm, ord)
    _check_listed([x[:cut], x[cut:]], max_norm, ord)


@pytest.mark.parametrize("ord", ORDS)
def test_parallel_twins_over_chunks(monkeypatch: pytest.MonkeyPatch, ord: float) -> None:
    """The ``prange`` twins with many chunks, the huge and subnormal values in some."""
    monkeypatch.setattr(_config, "PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(_config, "THREADS", "parallel")
    monkeypatch.setattr(_config, "CHUNK", 64)
    x = np.random.default_rng(3).standard_normal(1000)
    for edit in (None, (100, 1e250), (700, 1e-310)):
        y = x.copy()
        if edit is not None:
            y[edit[0] : edit[0] + 50] *= edit[1]
        for max_norm in (1e-300, 5.0):
            _check_whole(y, max_norm, ord)
            _check_listed([y[:300], y[300:]], max_norm, ord)
