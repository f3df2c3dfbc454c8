"""The bulk NumPy header read: ABI offsets and the self-check before first use.

``read_headers`` reads data pointer, size and flags of every ndarray of a list
in one kernel call (``_header_kernels.numpy_headers``); ``headers_ok`` says,
once per process, whether that read gives NumPy's own answers on this build.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._launch import run_serial

# PyArrayObject_fields: ob_refcnt, ob_type, data, nd (int, padded), dimensions,
# strides, base, descr, flags; PyListObject: ob_refcnt, ob_type, ob_size, ob_item.
# Checked against NumPy and CPython themselves before first use.
_OFFSETS = np.array([8, 16, 24, 32, 56, 64, 24], np.int64)
_headers_ok: bool | None = None


def read_headers(arrays: list[Any], dtype: np.dtype, writing: bool = False) -> tuple[Any, ...]:
    """(addrs, sizes, status, n_bad, disjoint, total) of a list, from one kernel call."""
    return run_serial(  # type: ignore[no-any-return]
        "numpy_headers",
        id(arrays),
        len(arrays),
        id(np.ndarray),
        id(dtype),
        _OFFSETS,
        dtype.itemsize,
        writing,
    )


def check_headers() -> bool:
    """Does reading headers from memory give NumPy's own answers on this build?"""
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    probes: list[Any] = [
        np.zeros((3, 5), np.float32),
        np.zeros((4, 6), np.float32)[:, ::2],
        np.zeros(7, np.float32)[1:],
        np.zeros((2, 3, 4), np.float32),
        np.zeros(0, np.float32),
        ro,
        np.zeros(3, np.float64),
        [1.0],
    ]
    try:
        addrs, sizes, status = read_headers(probes, np.dtype(np.float32))[:3]
        for i, a in enumerate(probes):
            ok = (
                type(a) is np.ndarray
                and a.dtype == np.float32
                and a.flags.c_contiguous
                and a.flags.writeable
                and a.flags.aligned
            )
            if bool(status[i] == 0) != ok:
                return False
            if ok and (sizes[i] != a.size or (a.size and addrs[i] != a.ctypes.data)):
                return False
        return True
    except Exception:  # pragma: no cover - an unexpected ABI: use the slow path
        return False


def headers_ok() -> bool:
    """``check_headers()``, run once per process."""
    global _headers_ok
    if _headers_ok is None:
        _headers_ok = check_headers()
    return _headers_ok
