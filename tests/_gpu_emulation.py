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
