"""A Python twin of the GPU route's wide-norm kernels (``fastclip_partial_pow_sum_wide``,
``fastclip_finish_wide`` in ``fastclip/_gpu/kernels.cu``), and the references and data
their tests share (tests/gpu/emulated/test_gpu_wide_emulated.py and
test_gpu_wide_host_compiled.py).

The twin is a transcription of the CUDA source that reads and writes through raw
addresses in kernel argument order ("device memory" is NumPy memory, as in
tests/_gpu_emulation.py): each thread's float64 sum in the kernel's order
(16-byte vectors where the chunk is aligned, then the strided tail), the
warp-shuffle tree of ``block_reduce``, the gated rescaling modes and the finish
stages.  The one difference from the device: nvcc may fuse ``acc + a * a`` into
one FMA (one rounding fewer), so device and twin agree to float64 rounding, not
bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import _gpu_emulation
import numpy as np
import pytest
from _gpu_emulation import mem

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (NumPy bfloat16) is not installed")
BF16 = np.dtype(ml_dtypes.bfloat16)
CTYPES = {**_gpu_emulation.CTYPES, "__nv_bfloat16": BF16}
KINDS = {"float16", "float32", "float64", "bfloat16"}
ORDS = {1: (1, 1.0), 2: (2, 2.0), math.inf: (0, math.inf), 3: (3, 3.0)}
DTYPES = ["float16", "float32", "float64", "bfloat16"]

#: every launch: (kernel name, C++ type, mode or stage, whether its blocks did any work)
LAUNCHES: list[tuple[str, str, int, bool]] = []

# ------------------------------------------------------------ the CUDA twin


def combine(a: np.ndarray, b: np.ndarray, ord_code: int) -> np.ndarray:
    """``combine`` elementwise: max letting NaN win (``max_nan``) or the float64 sum."""
    return np.maximum(a, b) if ord_code == 0 else a + b


def block_reduce(v: np.ndarray, ord_code: int) -> float:
    """``block_reduce`` of one value per thread: ``warp_reduce`` (``__shfl_down_sync``
    with offsets 16..1; a lane past the warp's end reads its own value), lane 0 of
    each warp into ``shared``, then warp 0 reduces ``shared`` (0 past ``nwarps``)."""
    assert v.size % 32 == 0, "blockDim is a multiple of the warp size"

    def warp(w: np.ndarray) -> float:
        for off in (16, 8, 4, 2, 1):
            w = combine(w, np.concatenate([w[off:], w[32 - off :]]), ord_code)
        return float(w[0])

    shared = np.array([warp(v[i : i + 32]) for i in range(0, v.size, 32)])
    return warp(np.concatenate([shared, np.zeros(32 - shared.size)]))


def wide_terms(x: np.ndarray, ord_code: int, p: float, inv: float) -> np.ndarray:
    """``wide_term`` of every element: |x| widened to double, times inv, to the power
    (C's ``pow`` element by element: NumPy's vectorised float64 power may differ from
    it in the last bit)."""
    a = np.abs(x.astype(np.float64)) * inv
    if ord_code == 3:
        return np.array([_c_pow(v, p) for v in a.tolist()], np.float64)
    with np.errstate(over="ignore", under="ignore"):
        return a * a if ord_code == 2 else a


def _c_pow(a: float, p: float) -> float:
    try:
        return math.pow(a, p)
    except OverflowError:  # C's pow returns inf (HUGE_VAL), as CUDA's does
        return math.inf


def thread_sums(
    s: np.ndarray, terms: np.ndarray, ord_code: int, block: int, acc: Any = np.float64
) -> np.ndarray:
    """``thread_pow_sum_wide``: thread t's sum, in the kernel's order, in ``acc``
    (float64; float32 models the route's other kernel, for the contrast test)."""
    sums = np.zeros(block, acc)
    n, vec = terms.size, 16 // s.dtype.itemsize
    done = 0
    with np.errstate(all="ignore"):
        if s.ctypes.data % 16 == 0:  # aligned16: vector i goes to thread i % blockDim
            nv = n // vec
            rows = terms[: nv * vec].reshape(nv, vec).astype(acc)
            for r in range(0, nv, block):
                part = rows[r : r + block]
                for j in range(vec):
                    sums[: len(part)] = combine(sums[: len(part)], part[:, j], ord_code)
            done = nv * vec
        tail = terms[done:].astype(acc)
        for r in range(0, tail.size, block):
            part = tail[r : r + block]
            sums[: len(part)] = combine(sums[: len(part)], part, ord_code)
    return sums.astype(np.float64)


def partial_wide(targ: str, block: int, a: tuple[Any, ...], acc: Any = np.float64) -> None:
    ptrs, sizes, ct, cs, nc, chunk, ord_code, p, mode, state, partials = a
    nc, ord_code, mode = int(nc), int(ord_code), int(mode)
    inv = 1.0
    if mode == 1:
        if mem(state, 2, np.float64)[1] == 0.0:
            LAUNCHES.append(("fastclip_partial_pow_sum_wide", targ, mode, False))
            return
        ord_code = 0
    elif mode == 2:
        inv = float(mem(state, 2, np.float64)[1])
        if not inv > 0.0:
            LAUNCHES.append(("fastclip_partial_pow_sum_wide", targ, mode, False))
            return
    LAUNCHES.append(("fastclip_partial_pow_sum_wide", targ, mode, True))
    ct_a, cs_a = mem(ct, nc, np.int64), mem(cs, nc, np.int64)
    n_t = int(ct_a.max()) + 1 if nc else 0
    ptr_a, size_a = mem(ptrs, n_t, np.uint64), mem(sizes, n_t, np.int64)
    out = mem(partials, nc, np.float64)
    for c in range(nc):
        t, start = int(ct_a[c]), int(cs_a[c])
        end = min(start + int(chunk), int(size_a[t]))
        seg = mem(ptr_a[t], size_a[t], CTYPES[targ])[start:end]
        terms = wide_terms(seg, ord_code, float(p), inv)
        out[c] = block_reduce(thread_sums(seg, terms, ord_code, block, acc), ord_code)


def root(v: float, ord_code: int, p: float) -> float:
    """The kernels' root: itself for max and 1, ``sqrt``, else C's ``pow(v, 1 / p)``."""
    if ord_code in (0, 1):
        return v
    if math.isnan(v):
        return v
    return math.sqrt(v) if ord_code == 2 else _c_pow(v, 1.0 / p)


def finish_wide(targ: str, block: int, a: tuple[Any, ...]) -> None:
    partials, n, ord_code, p, stage, safe_lo, safe_hi, state, norm_out = a
    n, ord_code, p, stage = int(n), int(ord_code), float(p), int(stage)
    st_a = mem(state, 2, np.float64, null_is_empty=True)
    out = mem(norm_out, 1, CTYPES[targ])
    LAUNCHES.append(("fastclip_finish_wide", targ, stage, True))
    if stage == 2 and st_a[1] == 0.0:
        return
    if stage == 3 and not st_a[1] > 0.0:
        out[0] = root(float(st_a[0]), ord_code, p)
        return
    oc = 0 if stage == 2 else ord_code
    parts = mem(partials, n, np.float64)
    per_thread = np.zeros(block)
    for i in range(n):  # thread i % blockDim combines partials i, i + blockDim, ...
        per_thread[i % block] = combine(per_thread[i % block], parts[i], oc)
    v = block_reduce(per_thread, oc)
    if stage == 0:
        out[0] = root(v, ord_code, p)
    elif stage == 1:
        st_a[0] = v
        st_a[1] = 0.0 if float(safe_lo) < v < float(safe_hi) else -1.0
    elif stage == 2:
        e = math.frexp(v)[1] if math.isfinite(v) else 0
        st_a[1] = math.ldexp(1.0, max(-1022, min(1023, -e))) if 0.0 < v < math.inf else 0.0
    else:
        out[0] = root(v, 2 if ord_code == 2 else 3, p) / float(st_a[1])


def emulate(name: str, targ: str) -> Any:
    if name == "fastclip_partial_pow_sum_wide":
        return lambda grid, block, a: partial_wide(targ, block[0], a)
    if name == "fastclip_finish_wide":
        return lambda grid, block, a: finish_wide(targ, block[0], a)
    raise AssertionError(f"norm64 launched {name}")


class HostLib(_gpu_emulation.HostLib):
    """The GPU adapter interface over NumPy memory (bfloat16: ml_dtypes)."""

    kind = staticmethod(lambda x: str(x.dtype) if str(x.dtype) in KINDS else None)


# ---------------------------------------------------------------- references


def exact(parts: list[np.ndarray], ord: float) -> float:
    """The norm in exact arithmetic of the widened elements, rounded once."""
    flat = np.concatenate([np.abs(a.astype(np.float64)).ravel() for a in parts])
    if ord == math.inf:
        return math.nan if np.isnan(flat).any() else (float(flat.max()) if flat.size else 0.0)
    if ord == 2:
        return math.sqrt(math.fsum(flat * flat))
    if ord == 1:
        return math.fsum(flat)
    return math.fsum(flat**ord) ** (1.0 / ord)


def data(n: int, dtype: str, seed: int, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(CTYPES_BY_NAME[dtype])


CTYPES_BY_NAME = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
CTYPES_BY_NAME["bfloat16"] = BF16


def dyadic(n: int, dtype: str, seed: int) -> np.ndarray:
    """Values k / 256 with |k| <= 1024: every power sum below is exact in float64 (each
    square is a multiple of 2**-16 below 16, each cube of 2**-24 below 64), but not in
    float32 once a thread's sum passes 2**8 (squares) or 2**0 (cubes)."""
    k = np.random.default_rng(seed).integers(-1024, 1025, n)
    return (k / 256.0).astype(CTYPES_BY_NAME[dtype])


# the autouse fixture's patches hold for every example (TABLES is cleared in the test)
