"""The CPU route's 16-bit conversions (``fastclip/_cpu/_intrinsics.py`` through
``_elements.widen`` / ``narrow``), bit-exact against NumPy (float16) and torch
(bfloat16) on every one of the 65,536 bit patterns, and on float32 values that
round (ties to even, overflow to inf, subnormals, NaN).

This file owns the CPU route's 16-bit conversions; 16-bit results of the operations are
in tests/api/.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from fastclip._cpu._elements import narrow, widen

ALL_BITS = np.arange(65536, dtype=np.uint32).astype(np.uint16)


@njit(cache=False)
def _widen_all(bits):  # type: ignore[no-untyped-def]
    out = np.empty(bits.size, np.float32)
    for i in range(bits.size):
        out[i] = widen(bits[i])
    return out


@njit(cache=False)
def _narrow_all(values, like):  # type: ignore[no-untyped-def]
    out = np.empty(values.size, like.dtype)
    for i in range(values.size):
        out[i] = narrow(values[i], like[0])
    return out


def _float32_probe() -> np.ndarray:
    """Every 16-bit value widened, the midpoints between neighbours (ties), values
    just beside them, the ends of the ranges, and random float32 bit patterns."""
    rng = np.random.default_rng(0)
    f16 = ALL_BITS.view(np.float16).astype(np.float32)
    bf16 = (ALL_BITS.astype(np.uint32) << 16).view(np.float32)
    parts = [f16, bf16]
    for grid in (np.sort(f16[np.isfinite(f16)]), np.sort(bf16[np.isfinite(bf16)])):
        mid = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
        parts += [
            mid,
            np.nextafter(mid, np.float32(np.inf)),
            np.nextafter(mid, np.float32(-np.inf)),
        ]
    parts.append(
        rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    )
    parts.append(
        np.array([3.4e38, -3.4e38, 65504.0, 65520.0, 1e-45, -0.0, np.inf, -np.inf], np.float32)
    )
    return np.concatenate(parts)


def _same_bits(got: np.ndarray, want: np.ndarray, nan_bits: int) -> None:
    """Equal bit for bit, except that any NaN only has to stay a (quiet) NaN."""
    gb, wb = got.view(np.uint16), want.view(np.uint16)
    nan = (wb & 0x7FFF) > nan_bits
    assert np.array_equal(nan, (gb & 0x7FFF) > nan_bits)
    assert np.array_equal(gb[~nan], wb[~nan]), np.flatnonzero(gb[~nan] != wb[~nan])[:5]


def test_float16_widening_is_exact_on_every_pattern():
    got = _widen_all(ALL_BITS.view(np.int16))
    want = ALL_BITS.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_bfloat16_widening_is_exact_on_every_pattern():
    got = _widen_all(ALL_BITS)
    want = (ALL_BITS.astype(np.uint32) << 16).view(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_float16_narrowing_rounds_as_numpy():
    values = _float32_probe()
    got = _narrow_all(values, np.zeros(1, np.int16))
    with np.errstate(over="ignore"):
        want = values.astype(np.float16).view(np.int16)
    _same_bits(got, want, 0x7C00)


def test_bfloat16_narrowing_rounds_as_torch():
    torch = pytest.importorskip("torch")
    values = _float32_probe()
    got = _narrow_all(values, np.zeros(1, np.uint16))
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    _same_bits(got, want, 0x7F80)
    nan = np.isnan(values)
    assert np.all(got[nan] & 0x40), "a NaN narrowed to bfloat16 stays quiet"
