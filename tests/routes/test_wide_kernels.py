"""The CPU route's float64-accumulating norm (``norm64(..., wide=True)``,
``fastclip/_cpu/_wide_kernels.py``), used by ``fastclip.distributed`` for a rank's
local norm: checked against an exactly rounded float64 oracle (``math.fsum`` of
the widened elements), and for independence from how the data is split."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastclip import _config, _dispatch
from fastclip.distributed import _local

torch = pytest.importorskip("torch", reason="torch is not installed")

ORD_CODES = {1: (1, 1.0), 2: (2, 2.0), math.inf: (0, math.inf), 3: (3, 3.0)}


def _exact(parts: list[np.ndarray], ord: float) -> float:
    """The norm of all elements in exact arithmetic, rounded once to float64."""
    flat = np.concatenate([np.abs(p.astype(np.complex128)).ravel() for p in parts])
    if ord == math.inf:
        return float(flat.max()) if flat.size else 0.0
    if ord == 2:  # squares of the widened parts, summed exactly
        both = np.concatenate([p.astype(np.complex128).ravel() for p in parts])
        sq = np.concatenate([both.real**2, both.imag**2])
        return math.sqrt(math.fsum(sq))
    return math.fsum(flat**ord) ** (1.0 / ord)


def _wide(arrays: list[Any], ord: float) -> float:
    code, p = ORD_CODES[ord]
    return float(_dispatch.backend_for(arrays).norm64(arrays, code, p, None, wide=True))


def _data(n: int, dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 3.0
    if dtype.startswith("complex"):
        x = x + 1j * rng.standard_normal(n)
    return x.astype(dtype)


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "complex64", "complex128"])
@pytest.mark.parametrize("n", [0, 7, 5000, 400_000])  # 400_000: the parallel kernel
def test_wide_norm_matches_the_exact_float64_norm(dtype: str, ord: float, n: int) -> None:
    x = [_data(n, dtype, 1), _data(n // 3 + 1, dtype, 2)]
    before = [a.copy() for a in x]
    got = _wide(x, ord)
    # float64 accumulation: ~n * 2**-53 relative at worst, far below float32's rounding
    assert got == pytest.approx(_exact(x, ord), rel=1e-13, abs=0.0)
    for a, b in zip(x, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
def test_wide_norm_of_bfloat16_tensors(ord: float) -> None:
    t = [torch.from_numpy(_data(300_001, "float32", 3)).to(torch.bfloat16), torch.zeros(0)]
    t[1] = torch.from_numpy(_data(11, "float32", 4)).to(torch.bfloat16)
    parts = [a.to(torch.float64).numpy() for a in t]  # bfloat16 -> float64 is exact
    assert _wide(t, ord) == pytest.approx(_exact(parts, ord), rel=1e-13, abs=0.0)


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 20_000), max_size=7),
    dtype=st.sampled_from(["float16", "float32", "complex64"]),
    ord=st.sampled_from([1, 2]),
)
def test_the_wide_norm_does_not_depend_on_the_split(
    cuts: list[int], dtype: str, ord: float
) -> None:
    whole = _data(20_000, dtype, 5)
    parts = np.split(whole, sorted(cuts))
    ref = _exact([whole], ord)
    one, split = _wide([whole], ord), _wide(parts, ord)
    assert one == pytest.approx(ref, rel=1e-14, abs=0.0)
    assert split == pytest.approx(ref, rel=1e-14, abs=0.0)


def test_the_split_test_would_fail_on_float32_block_sums() -> None:
    """The reason the wide kernels exist: float32 block sums of the same elements
    differ by more than 1e-14 between two splits (so the test above can fail)."""
    whole = _data(1_000_000, "float32", 6)
    parts = np.split(whole, [1, 4097, 123_457])
    code, p = ORD_CODES[2]
    route = _dispatch.backend_for([whole])
    a = float(route.norm64([whole], code, p, None))
    b = float(route.norm64(parts, code, p, None))
    assert abs(a - b) / _exact([whole], 2) > 1e-14


def test_wide_norm_rescales_float64_sums_out_of_range() -> None:
    big = np.array([1e200, 1e200, -1e200])
    tiny = np.array([1e-310, 2e-310])
    assert _wide([big], 2) == pytest.approx(math.sqrt(3.0) * 1e200, rel=1e-15)
    assert _wide([tiny], 2) == pytest.approx(math.sqrt(5.0) * 1e-310, rel=1e-6)  # subnormal
    # float32 squares of 3e38 overflow float32, not float64: the float64 value, finite
    near_max = np.full(3, 3e38, np.float32)
    assert _wide([near_max], 2) == pytest.approx(math.sqrt(3.0) * float(near_max[0]), rel=1e-15)


def test_wide_norm_propagates_nan_and_inf() -> None:
    x = _data(200_000, "float32", 7)
    x[12345] = np.nan
    for ord in (1, 2, math.inf, 3):
        assert math.isnan(_wide([x], ord))
    x[12345] = np.inf
    for ord in (1, 2, math.inf, 3):
        assert _wide([x], ord) == math.inf


@pytest.mark.parametrize("threads", ["serial", "parallel"])
def test_distributed_local_norm_takes_the_wide_kernels(
    threads: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fastclip.distributed``'s local norm of CPU arrays is the wide kernels' value,
    serial or parallel, for NumPy arrays and CPU tensors alike."""
    monkeypatch.setattr(_config, "THREADS", threads)
    x = [_data(400_000, "float32", 8), _data(999, "float16", 9)]
    t = [torch.from_numpy(a.copy()) for a in x]
    ref = _exact(x, 2)
    assert _local.local_norm(x, 2, 2.0) == pytest.approx(ref, rel=1e-13, abs=0.0)
    assert _local.local_norm(t, 2, 2.0) == pytest.approx(ref, rel=1e-13, abs=0.0)
