"""Shared by the GPU drivers' host-side tests (``test_gpu_*emulated.py``).

No GPU here, so "device memory" is NumPy memory and pointers are host
addresses: :func:`mem` views ``n`` elements at a raw address (as a kernel
reads them) and :class:`HostLib` is the GPU adapter interface of
``fastclip._gpu._adapters`` over NumPy arrays.  Each test file subclasses
``HostLib`` for what it needs to see differently.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from typing import Any

import numpy as np

#: The CUDA element types of the kernels' name expressions, as NumPy dtypes.
CTYPES = {"float": np.float32, "double": np.float64, "__half": np.float16}
#: (ord_code, p) pairs as the drivers pass them: 2-norm, 1-norm, max, a general p.
PCODES = [(2, 2.0), (1, 1.0), (0, math.inf), (3, 3.0)]


def pow_sum(v: np.ndarray, ord_code: int, p: float) -> float:
    """A kernel's partial result in float64: the max of |v| (NaN wins) for ord_code 0,
    else the sum of |v|, |v|**2 or |v|**p (over- and underflowing silently, as a GPU)."""
    a = np.abs(v.astype(np.float64))
    if ord_code == 0:
        return np.nan if np.isnan(a).any() else (a.max() if a.size else 0.0)
    with np.errstate(all="ignore"):
        return float(np.sum(a**2 if ord_code == 2 else (a if ord_code == 1 else a**p)))


def root(v: float, ord_code: int, p: float) -> float:
    """The norm from a combined partial: itself for max and 1, its square or p-th root."""
    if ord_code in (0, 1):
        return v
    return math.sqrt(v) if ord_code == 2 else v ** (1.0 / p)


def coefficient(norm: Any, max_norm: float, eps: float, mode: int) -> Any:
    """kernels.cu's ``coefficient``, elementwise: mode 1 clips (zero-norm rule:
    ``norm + eps == 0`` gives 1), mode 2 normalises; NaN propagates."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        den = np.float64(norm) + eps
        r = 1.0 / den if mode == 2 else max_norm / den
        return np.where((mode == 1) & ((r >= 1.0) | (den == 0.0)), 1.0, r)


def coefficient_parts(norm: Any, max_norm: float, eps: float, mode: int) -> tuple[Any, Any]:
    """kernels.cu's ``coefficient_parts``, transcribed elementwise: (c, c2), c2 = 2**-1000
    where ``num / den`` < 2**-1000, 2**1000 where a normalisation's quotient > 2**1000."""
    big = 2.0**1000
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        den = np.float64(norm) + eps
        num = 1.0 if mode == 2 else max_norm
        finite = (den == den) & (den <= np.finfo(np.float64).max)
        under = (num > 0.0) & finite & (den / big > num)
        over = (mode == 2) & (den > 0.0) & (den * big < num)
        c = np.where(
            under,
            (num * big) / den,
            np.where(over, (num / big) / den, coefficient(norm, max_norm, eps, mode)),
        )
        c2 = np.where(under, 1.0 / big, np.where(over, 1.0 * big, 1.0))
    return c, c2


def scaled2(x: np.ndarray, c: Any, c2: Any) -> np.ndarray:
    """kernels.cu's ``scaled2``: (x * c) * c2, each product in float64 rounded once to
    the accumulator type (float64 for float64 data, else float32), the first one also
    to the storage type before the second (as a second pass over memory)."""
    dt = x.dtype
    acc = np.float64 if dt == np.float64 else np.float32
    c2 = np.broadcast_to(np.asarray(c2, np.float64), x.shape)
    first = (x.astype(np.float64) * c).astype(acc)
    second = (first.astype(dt).astype(np.float64) * c2).astype(acc)
    return np.where(c2 != 1.0, second, first).astype(dt)


#: float32's smallest and largest normal magnitudes (optim_kernels.cu's coef_in_range).
F32_NORMAL = (1.1754943508222875e-38, 3.4028234663852886e38)
#: per_sample_kernels.cu's ps_tiny_factor threshold: 2**-60.
PS_TINY = 8.673617379884035e-19


def times_coef(g: np.ndarray, c64: float, acc: Any) -> np.ndarray:
    """optim_kernels.cu's ``times_coef`` with ``coef_in_range``: g (already in the
    arithmetic type ``acc``) times the float64 coefficient c64.  The product is taken
    in ``acc`` with c rounded to it while that rounding kept c's value (float64 data,
    0, inf, NaN, or a normal float32), else in float64 and rounded once to ``acc``
    (a c float32 flushes to 0, holds as a subnormal or overflows)."""
    c = acc(c64)
    a = abs(float(c))
    in_range = float(c) == c64 or math.isnan(c64) or F32_NORMAL[0] <= a <= F32_NORMAL[1]
    if in_range:
        return g * c
    return (g.astype(np.float64) * c64).astype(acc)


def ps_tiny_factor(f: Any, acc: Any) -> Any:
    """per_sample_kernels.cu's ``ps_tiny_factor``: a per-sample factor the float32
    arithmetic of 16/32-bit rows cannot take (0 < f < 2**-60); such rows are
    multiplied in float64."""
    f = np.asarray(f, np.float64)
    return (np.dtype(acc).itemsize == 4) & (f > 0.0) & (f < PS_TINY)


def mem(
    ptr: int, n: int, dtype: Any, *, null_is_empty: bool = False, regions: Any = None
) -> np.ndarray:
    """``n`` elements of ``dtype`` at address ``ptr`` (a view: writes go through).

    ``null_is_empty``: a null pointer reads as nothing (optional arrays).
    ``regions``: ``(start, end, array)`` triples; an access outside every one
    fails an assertion instead of corrupting the interpreter.
    """
    dtype = np.dtype(dtype)
    if int(n) == 0 or (null_is_empty and int(ptr) == 0):
        return np.zeros(0, dtype)
    lo, hi = int(ptr), int(ptr) + int(n) * dtype.itemsize
    if regions is not None:
        assert any(s <= lo and hi <= e for s, e, _ in regions), "access outside every buffer"
    return np.frombuffer((ctypes.c_byte * (hi - lo)).from_address(lo), dtype)


class HostLib:
    """The GPU adapter interface over NumPy memory; counts host reads in ``syncs``."""

    name = "host"
    syncs = 0
    is_float = staticmethod(lambda x: x.dtype.kind == "f")
    device_id = staticmethod(lambda x: 0)
    ptr = staticmethod(lambda x: x.ctypes.data)
    numel = staticmethod(lambda x: x.size)
    contiguous = staticmethod(lambda x: x.flags.c_contiguous)
    strides = staticmethod(lambda x: x.strides)
    as_contiguous = staticmethod(np.ascontiguousarray)
    permute = staticmethod(lambda x, perm: x.transpose(perm))
    reshape = staticmethod(lambda x, shape: x.reshape(shape))
    empty = staticmethod(lambda shape, kind, like: np.empty(shape, kind))
    empty_like = staticmethod(lambda x: np.empty(x.shape, x.dtype))
    full_f64 = staticmethod(lambda v, like: np.full((), v, np.float64))
    to_f64 = staticmethod(lambda v: np.asarray(v, np.float64).reshape(()))
    stream = staticmethod(lambda x: contextlib.nullcontext())
    stream_id = staticmethod(lambda x: 0)
    upload = staticmethod(lambda buf, like: (buf.copy(), None))
    touched = staticmethod(lambda arrays: None)

    @staticmethod
    def write_back(x: Any, values: Any) -> None:
        x[...] = values

    @classmethod
    def host_float(cls, x: Any) -> float:
        cls.syncs += 1
        return float(x)


# ------------------------------------------- coefficients beyond 2**+-1000 (two factors)

#: ord -> (ord_code, p) as the drivers pass them.
ORD_CODES = {1: (1, 1.0), 2: (2, 2.0), math.inf: (0, math.inf), 3: (3, 3.0)}
#: (name, float64 data, max_norm or None to normalise, the ords it is checked for):
#: quotients beyond 2**+-1000, the cases of tests/api/test_coefficient_range.py (one
#: float64 factor gives 0, NaN or inf).  The GPU route's L2 and general-p power sums
#: are not rescaled (kernels.cu: 1e300**2 is inf, 1e-310**2 is 0), so the cases whose
#: power sum leaves float64's range are checked for ord 1 and inf only.
COEF_CASES = [
    ("clip 1e300 to 1e-300", [1e300, -2e300, 3e299], 1e-300, (1, math.inf)),
    ("clip 1e200 to 1e-200", [5e200, 1e200], 1e-200, (1, math.inf)),
    ("clip 1e100 to 1e-300", [1e100, -2e100, 5e99], 1e-300, (1, 2, math.inf, 3)),
    ("normalize subnormal", [0.0, 1e-310, -2e-310], None, (1, math.inf)),
    ("normalize smallest subnormals", [5e-324, 1e-323], None, (1, math.inf)),
    ("normalize near float64's max", [6e307, -8e307], None, (1, math.inf)),
]


def exact_scaled(x: np.ndarray, num: float, den: float) -> np.ndarray:
    """x * num / den, every element rounded once to float64 (exact rationals)."""
    from fractions import Fraction

    q = Fraction(num) / Fraction(den)
    return np.array([float(Fraction(float(v)) * q) for v in x.reshape(-1)]).reshape(x.shape)


def cpu_rescale(x: np.ndarray, c: float | None, ord: float, axis: Any = None) -> np.ndarray:
    """The CPU route's clip_by_norm (c given) or normalize (c None), eps = 0."""
    import fastclip

    if c is None:
        return np.asarray(fastclip.normalize(x, ord=ord, eps=0.0, axis=axis))
    return np.asarray(fastclip.clip_by_norm(x, c, ord=ord, eps=0.0, axis=axis))


def gpu_rescale(
    gpu: Any,
    lib: Any,
    x: np.ndarray,
    c: float | None,
    ord: float,
    axes: Any = None,
    inplace: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The GPU driver's clip_by_norm / normalize of x (eps = 0) under ``lib``: (out, norms)."""
    code, p = ORD_CODES[ord]
    mode = "normalize" if c is None else "clip"
    out, norms = gpu.rescale(lib, x, code, p, axes, 1.0 if c is None else c, 0.0, mode, inplace)
    return out, np.asarray(norms)


def two_factor_reference(x: np.ndarray, norms: Any, c: float | None, axes: Any) -> np.ndarray:
    """(x * c) * c2 with the CPU route's ``coefficient_parts`` of the given norms
    (in float64, ``norms`` broadcast over the reduced ``axes``)."""
    from fastclip import _formulas

    n = np.asarray(norms, np.float64)
    if axes is not None:
        n = np.expand_dims(n, axes)
    mode = "normalize" if c is None else "clip"
    c1, c2 = _formulas.coefficient_parts(n, 1.0 if c is None else c, 0.0, mode)
    return (x * c1) * c2


def check_two_factor_cases(gpu: Any, lib: Any, ord: float) -> None:
    """Every COEF_CASES case through the GPU driver, whole array (in and out of place),
    rows and columns next to an ordinary row, the copied-in layout, and a list clipped
    by its global norm: bit for bit (x * c) * c2 with the CPU route's
    ``coefficient_parts`` of the GPU's norm, bit for bit the CPU route's result where
    the two routes' norms agree (ord 1 and inf here; an L2 sum may round otherwise),
    and within 1e-13 of the exact rationals."""
    import reference as ref

    import fastclip

    def close(got: np.ndarray, want: np.ndarray) -> None:
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=2e-323)

    def same(got: np.ndarray, norms: Any, x: np.ndarray, axes: Any, cpu: np.ndarray) -> None:
        np.testing.assert_array_equal(got, two_factor_reference(x, norms, c, axes))
        if ord in (1, math.inf):
            np.testing.assert_array_equal(got, cpu)

    for _, data, c, ords in COEF_CASES:
        if ord not in ords:
            continue
        x = np.asarray(data, np.float64)
        n = float(ref.norm(x, ord))
        want = x.copy() if c is not None and c >= n else exact_scaled(x, c or 1.0, n)
        cpu = cpu_rescale(x, c, ord)
        out, norm = gpu_rescale(gpu, lib, x.copy(), c, ord)
        same(out, norm, x, None, cpu)
        close(out, want)
        work = x.copy()
        gpu_rescale(gpu, lib, work, c, ord, inplace=True)
        np.testing.assert_array_equal(work, out)
        # row 0 needs two factors, row 1 (ordinary data) one: both in one launch
        other = np.asarray([3.0, 4.0, 12.0][: len(data)])
        rows = np.stack([x, other])
        got, norms = gpu_rescale(gpu, lib, rows.copy(), c, ord, (1,))
        same(got, norms, rows, (1,), cpu_rescale(rows, c, ord, axis=1))
        close(got[0], want)
        cols = rows.T.copy()
        _, norms = gpu_rescale(gpu, lib, cols, c, ord, (0,), inplace=True)
        same(cols, norms, rows.T, (0,), cpu_rescale(rows.T.copy(), c, ord, axis=0))
        close(cols[:, 0], want)
        # the copied-in layout: reduction over the middle axis of [1, n, 2]
        cube = np.ascontiguousarray(np.stack([x, other], axis=1)[None])
        got, norms = gpu_rescale(gpu, lib, cube, c, ord, (1,))
        same(got, norms, cube, (1,), cpu_rescale(cube, c, ord, axis=1))
        close(got[0, :, 0], want)
        if c is None:
            continue
        # global lists: the second array strided, out of place and in place
        a, base = x[:2].copy(), np.zeros(2 * (len(x) - 1))
        base[::2] = np.append(x[2:], 1e99)
        b = base[::2]
        t = float(ref.global_norm([a, b.copy()], ord))
        cpu_outs, _ = fastclip.clip_by_global_norm([a, b], c, ord=ord, eps=0.0)
        code, p = ORD_CODES[ord]
        outs, total = gpu.clip_global(lib, [a, b], c, code, p, 0.0, None, False, False)
        for o, y, w in zip(outs, (a, b), cpu_outs, strict=True):
            same(o, total, y, None, w)
        close(outs[0], exact_scaled(a, c, t))
        gaps = base[1::2].copy()
        gpu.clip_global(lib, [a, b], c, code, p, 0.0, None, False, True)
        np.testing.assert_array_equal(a, outs[0])
        np.testing.assert_array_equal(b, outs[1])
        np.testing.assert_array_equal(base[1::2], gaps)  # the gaps are not written
