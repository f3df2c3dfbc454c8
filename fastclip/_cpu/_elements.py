# mypy: ignore-errors
# (numba kernel code: typed by numba at compile time, not by mypy)
"""Per-element helpers shared by every CPU kernel, specialised by storage dtype.

Kernels are written once, as scalar loops over a storage array; these
overloads pick, at compile time, how one stored element is widened to the
accumulation type and narrowed back:

=============  ==============  ============  ==========================
storage        meaning         widened to    accumulated in (blocks)
=============  ==============  ============  ==========================
float32        float32         float32       float32 blocks -> float64
float64        float64         float64       float64
uint16         bfloat16 bits   float32       float32 blocks -> float64
int16          float16 bits    float32       float32 blocks -> float64
complex64      complex64       complex64     float32 blocks -> float64
complex128     complex128      complex128    float64
=============  ==============  ============  ==========================
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from ._intrinsics import bits_f32, f16_bits_to_f32, f32_bits, f32_to_f16_bits

# The largest float32 block sum we trust: above it (or NaN) the block is
# recomputed in float64, so squares of |x| ~ 1e20 never turn a norm into inf.
F32_SAFE = np.float32(3.0e38)
# Below this a float32 sum of squares may have lost terms to underflow
# (squares of |x| < 1e-19 flush toward 0): the block is redone in float64.
F32_TINY = np.float32(1.0e-30)


def widen(v):  # type: ignore[no-untyped-def]
    """Stored element -> arithmetic value (float32/float64/complex)."""
    raise NotImplementedError  # pragma: no cover - replaced by the overload


def narrow(w, like):  # type: ignore[no-untyped-def]
    """Arithmetic value -> stored element of ``like``'s type (round to nearest even)."""
    raise NotImplementedError  # pragma: no cover


def acc_zero(v):  # type: ignore[no-untyped-def]
    """A zero of the block accumulator type for stored element ``v``."""
    raise NotImplementedError  # pragma: no cover


def acc_limit(v):  # type: ignore[no-untyped-def]
    """Largest trusted block sum for ``v``'s accumulator (inf for float64)."""
    raise NotImplementedError  # pragma: no cover


def acc_tiny(v):
    """Smallest trusted float32 block sum of squares (0 for float64 accumulators)."""
    raise NotImplementedError  # pragma: no cover


def coef_like(c, v):  # type: ignore[no-untyped-def]
    """A float64 coefficient in the arithmetic precision of stored element ``v``."""
    raise NotImplementedError  # pragma: no cover


def abs2(w):  # type: ignore[no-untyped-def]
    """|w|**2 of a widened value (re**2 + im**2 for complex)."""
    raise NotImplementedError  # pragma: no cover


def abs1(w):  # type: ignore[no-untyped-def]
    """|w| of a widened value."""
    raise NotImplementedError  # pragma: no cover


def abs64(w):  # type: ignore[no-untyped-def]
    """|w| of a widened value, in float64 (complex64 is widened to complex128 first:
    |3e38 + 3e38j| = 4.2e38 overflows float32, and the norm came out inf)."""
    raise NotImplementedError  # pragma: no cover


def _is32(t: types.Type) -> bool:
    return t in (types.float32, types.uint16, types.int16, types.complex64)


@overload(widen, inline="always")
def _widen(v):  # type: ignore[no-untyped-def]
    if v == types.uint16:

        def impl(v):  # type: ignore[no-untyped-def]
            return bits_f32(np.uint64(v) << np.uint64(16))

        return impl
    if v == types.int16:
        return lambda v: f16_bits_to_f32(v)
    if v in (types.float32, types.float64, types.complex64, types.complex128):
        return lambda v: v
    return None


@overload(narrow, inline="always")
def _narrow(w, like):  # type: ignore[no-untyped-def]
    if like == types.uint16:

        def impl(w, like):  # type: ignore[no-untyped-def]
            u = np.uint64(f32_bits(np.float32(w)))
            if (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000):  # NaN: keep it quiet
                return np.uint16((u >> np.uint64(16)) | np.uint64(0x40))
            u = u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))
            return np.uint16((u >> np.uint64(16)) & np.uint64(0xFFFF))

        return impl
    if like == types.int16:
        return lambda w, like: f32_to_f16_bits(np.float32(w))
    if like == types.float32:
        return lambda w, like: np.float32(w)
    if like == types.float64:
        return lambda w, like: np.float64(w)
    if like == types.complex64:
        return lambda w, like: np.complex64(w)
    if like == types.complex128:
        return lambda w, like: np.complex128(w)
    return None


@overload(acc_zero, inline="always")
def _acc_zero(v):  # type: ignore[no-untyped-def]
    if _is32(v):
        return lambda v: np.float32(0.0)
    return lambda v: np.float64(0.0)


@overload(acc_limit, inline="always")
def _acc_limit(v):  # type: ignore[no-untyped-def]
    if _is32(v):
        return lambda v: F32_SAFE
    return lambda v: np.inf


@overload(acc_tiny, inline="always")
def _acc_tiny(v):
    if _is32(v):
        return lambda v: F32_TINY
    return lambda v: -1.0


@overload(coef_like, inline="always")
def _coef_like(c, v):  # type: ignore[no-untyped-def]
    if _is32(v):
        return lambda c, v: np.float32(c)
    return lambda c, v: np.float64(c)


@overload(abs2, inline="always")
def _abs2(w):  # type: ignore[no-untyped-def]
    if isinstance(w, types.Complex):
        return lambda w: w.real * w.real + w.imag * w.imag
    return lambda w: w * w


@overload(abs1, inline="always")
def _abs1(w):  # type: ignore[no-untyped-def]
    return lambda w: abs(w)


@overload(abs64, inline="always")
def _abs64(w):  # type: ignore[no-untyped-def]
    if isinstance(w, types.Complex):
        return lambda w: abs(np.complex128(w))
    return lambda w: abs(np.float64(w))
