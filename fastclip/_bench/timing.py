"""Timing: interleaved rounds, medians and spread, CUDA events, the bandwidth floor.

The machine is shared and noisy, so the implementations of one case are timed
in rounds: every round runs each of them once (a block of ``inner`` calls,
enough to last about ``TARGET_BLOCK_S``), in an order rotated from round to
round.  Reported: the median per-call time over rounds and the interquartile
range.  In-place blocks start from the original data (reset untimed before
each block; data of 8 MiB or more is timed one call per block), so every timed
call clips for real.  The first call of each implementation (compilation, cache loading,
allocator warm-up) is timed on its own and kept out of the statistics.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: A timed block lasts at least this long (timer resolution, loop overhead).
TARGET_BLOCK_S = 2e-3
#: ... and runs at most this many calls.
MAX_INNER = 10_000

#: The host bandwidth probe: in-place scale of 256 MiB of float32.
HOST_PROBE_BYTES = 256 * 2**20
HOST_PROBE_METHOD = "numba prange in-place scale (x *= 0.5, then x *= 2) of a 256 MiB float32 array"
CUDA_PROBE_BYTES = 1024 * 2**20


def sync(timer: str) -> None:
    if timer == "torch-cuda":
        import torch

        torch.cuda.synchronize()
    elif timer == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def time_block(timer: str, fn: Callable[[], Any], n: int) -> float:
    """Seconds per call of ``n`` back-to-back calls."""
    if timer == "cpu":
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n
    if timer == "torch-cuda":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    import cupy

    cstart, cend = cupy.cuda.Event(), cupy.cuda.Event()
    cstart.record()
    for _ in range(n):
        fn()
    cend.record()
    cend.synchronize()
    return cupy.cuda.get_elapsed_time(cstart, cend) / 1e3 / n


def first_call(timer: str, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of one call, synchronised (includes compilation), and its result."""
    sync(timer)
    t0 = time.perf_counter()
    out = fn()
    sync(timer)
    return time.perf_counter() - t0, out


def inner_count(timer: str, fn: Callable[[], Any], max_inner: int = MAX_INNER) -> int:
    """Calls per block so that a block lasts about ``TARGET_BLOCK_S``.

    Sized on the fastest of three calls: one slow call (data evicted by the
    previous implementation, another library's pool threads still spinning)
    must not shrink every block to a call or two, which would make that
    one-off cost most of each sample.
    """
    if max_inner <= 1:
        return 1
    dt = min(time_block(timer, fn, 1) for _ in range(3))
    return max(1, min(max_inner, math.ceil(TARGET_BLOCK_S / max(dt, 1e-9))))


#: Data at least this big is timed one call per block, each after a reset, so
#: every timed in-place call really changes the data: rewriting unchanged values
#: (what a second in-place clip with coefficient 1 does) measured up to 1.6x
#: faster than real clipping in DRAM on the 2-core CI machine.
SINGLE_CALL_BYTES = 8 * 2**20


class Timed:
    """One implementation to time: its timer, the call, and the reset run (untimed)
    before every block so in-place blocks start from the original data."""

    def __init__(
        self, timer: str, fn: Callable[[], Any], reset: Callable[[], None] | None, nbytes: int
    ) -> None:
        self.timer, self.fn, self.reset = timer, fn, reset
        self.max_inner = 1 if nbytes >= SINGLE_CALL_BYTES else MAX_INNER

    def block(self, n: int) -> float:
        if self.reset is not None:
            self.reset()
            sync(self.timer)
        return time_block(self.timer, self.fn, n)


def interleaved(
    ops: dict[str, Timed], repeat: int, tick: Callable[[str], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Time ``ops`` in ``repeat`` rounds, each round in an order rotated by one."""
    names = list(ops)
    inner = {}
    for k in names:
        op = ops[k]
        if op.reset is not None:
            op.reset()
        inner[k] = inner_count(op.timer, op.fn, op.max_inner)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeat):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for k in order:
            samples[k].append(ops[k].block(inner[k]))
        if tick is not None:
            tick(f"round {r + 1}/{repeat}")
    return {k: {**summarize(samples[k]), "inner": inner[k]} for k in names}


def summarize(samples: list[float]) -> dict[str, Any]:
    a = np.asarray(samples)
    q25, med, q75 = (float(v) for v in np.percentile(a, [25, 50, 75]))
    return {
        "median_s": med,
        "q25_s": q25,
        "q75_s": q75,
        "min_s": float(a.min()),
        "max_s": float(a.max()),
        "samples_s": [float(v) for v in a],
    }


# ---------------------------------------------------------------- bandwidth floor


_scale_kernel: Any = None


def _host_kernel() -> Any:
    global _scale_kernel
    if _scale_kernel is None:
        import numba

        @numba.njit(parallel=True, nogil=True, cache=False)
        def scale(a: Any, c: Any) -> None:  # pragma: no cover - compiled
            for i in numba.prange(a.size):
                a[i] *= c

        _scale_kernel = scale
    return _scale_kernel


def host_bandwidth(repeat: int = 10) -> dict[str, Any]:
    """Read+write bytes per second of a parallel in-place scale of 256 MiB."""
    kernel = _host_kernel()
    a = np.ones(HOST_PROBE_BYTES // 4, np.float32)
    factors = (np.float32(0.5), np.float32(2.0))  # exact; the values change on every pass
    kernel(a, factors[1])  # compile + fault the pages in
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        kernel(a, factors[i % 2])
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "method": HOST_PROBE_METHOD,
        "bytes_per_s": 2 * a.nbytes / med,
        "median_s": med,
        "samples_s": times,
    }


def cuda_bandwidth(repeat: int = 20) -> dict[str, Any] | None:
    """Device-to-device read+write bandwidth (in-place scale of 1 GiB), or None."""
    from .peers import gpu_storage

    storage = gpu_storage()
    if storage is None:
        return None
    if storage == "torch-cuda":
        import torch

        x = torch.ones(CUDA_PROBE_BYTES // 4, device="cuda")
        fn: Callable[[], Any] = lambda: x.mul_(1.0)  # noqa: E731
        timer, method = "torch-cuda", "torch in-place x.mul_(1) of 1 GiB float32, CUDA events"
    else:
        import cupy

        y = cupy.ones(CUDA_PROBE_BYTES // 4, dtype=cupy.float32)
        fn = lambda: y.__imul__(1.0)  # noqa: E731
        timer, method = "cupy", "cupy in-place x *= 1 of 1 GiB float32, CUDA events"
    for _ in range(3):
        fn()
    times = [time_block(timer, fn, 5) for _ in range(repeat)]
    med = statistics.median(times)
    return {
        "method": method,
        "bytes_per_s": 2 * CUDA_PROBE_BYTES / med,
        "median_s": med,
        "samples_s": times,
    }
