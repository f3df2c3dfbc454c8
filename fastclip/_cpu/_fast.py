"""The one-small-array fast paths of the CPU route.

A training loop that clips one small float32 NumPy array, or takes the norm of
one small array, pays more for validation, dispatch and wrapping than for the
kernel.  These paths take only plain C-contiguous NumPy arrays with plain
Python arguments that are already valid, run the same serial kernel as the
general path and return the same 0-d array; anything else returns None and
goes through the full validation and dispatch (which gives the errors).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from .. import _config as cfg
from .._formulas import SAFE_HI, SAFE_LO
from ._launch import run

_FAST_ORDS = {2: 2, 1: 1, math.inf: 0}


def _fast_ord_code(ord: Any) -> int | None:
    """ord_code of a plain Python 1, 2 or inf (the fast paths' orders), else None."""
    return _FAST_ORDS.get(ord) if type(ord) in (int, float) else None


_F32 = np.dtype(np.float32)
_FLOAT_MAX = sys.float_info.max
_F64 = np.dtype(np.float64)


def small_clip_(x: Any, max_norm: Any, ord: Any, eps: Any) -> Any:
    """The hot path of training loops that clip one small float32 NumPy array.

    Only a plain, writeable, C-contiguous float32 ndarray below the parallel
    threshold, with float/int arguments already valid, takes it; it runs the
    same serial kernel as the general path and returns the same 0-d norm.
    Anything else returns None and goes through the full validation and
    dispatch (which gives the errors).  Measured on the CI machine: 3.8 -> ~2 us
    for 1,000 values (``benchmarks/bench_core.py`` workload (d)).
    """
    if type(x) is not np.ndarray or x.dtype != _F32:
        return None
    ord_code = _fast_ord_code(ord)
    if ord_code is None or type(max_norm) not in (int, float) or type(eps) not in (int, float):
        return None
    if not (max_norm >= 0.0 and 0.0 <= eps < math.inf):
        return None
    if (type(max_norm) is int and max_norm > _FLOAT_MAX) or eps > _FLOAT_MAX:
        return None  # an int beyond float64: the general path's ValueError
    flags = x.flags
    if not (flags.c_contiguous and flags.writeable) or x.size >= cfg.PARALLEL_MIN_ELEMENTS:
        return None
    flat = x.reshape(-1)
    value = run(
        "arr_clip",
        flat.size,
        flat,
        flat,
        ord_code,
        float(ord),
        float(max_norm),
        float(eps),
        True,
        cfg.CHUNK,
    )
    return np.asarray(value, dtype=_F32)


def small_norm(x: Any, ord: Any) -> Any:
    """The whole-array norm of a C-contiguous float32/float64 NumPy array, ord 1, 2 or inf.

    The general path's validation, dispatch and wrapping cost more than the
    kernel itself for small arrays (``fastclip bench --full``'s ``norm 1e5``
    case: 0.49x NumPy before this path, 0.97x with it); this runs the same
    kernel and returns the same 0-d array.
    Anything else returns None and takes the general path, as does a float64
    L2 power sum outside the range where it is exact (the general path then
    rescales by max|x|).
    """
    if type(x) is not np.ndarray or not x.flags.c_contiguous:
        return None
    dtype = x.dtype
    if dtype != _F32 and dtype != _F64:
        return None
    ord_code = _fast_ord_code(ord)
    if ord_code is None:
        return None
    flat = x.reshape(-1)
    total = run("arr_pow_sum", flat.size, flat, ord_code, float(ord), 1.0, cfg.CHUNK)
    if ord_code != 2:
        return np.asarray(total, dtype=dtype)
    # float32 squares cannot over/underflow a float64 sum; float64 ones can
    if dtype == _F64 and not SAFE_LO < total < SAFE_HI:
        return None
    return np.asarray(math.sqrt(total), dtype=dtype)
