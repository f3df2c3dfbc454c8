"""Where parallel kernels start to beat serial ones: sets ``PARALLEL_MIN_ELEMENTS``.

    unset OPENBLAS_CORETYPE; python benchmarks/bench_threshold.py

Times the serial and the parallel twin of the fused clip kernel (``arr_clip``,
float32, in place) and of the multi-array norm (``tab_pow_sum``) from 1e3 to
1e6 elements, interleaved, medians of many calls, and prints the ratio.
"""

from __future__ import annotations

import statistics
import time

import numba
import numpy as np

from fastclip import _config as cfg
from fastclip._cpu._build import kernel


def median_time(fn, repeat: int = 31) -> float:  # type: ignore[no-untyped-def]
    fn()
    inner = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        if time.perf_counter() - t0 > 2e-4:
            break
        inner *= 2
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def main() -> None:
    print(f"numba {numba.__version__}, {numba.get_num_threads()} threads")
    print(
        f"{'elements':>10} {'serial clip':>12} {'parallel':>10} {'ratio':>6}   {'serial norm':>12} {'parallel':>10} {'ratio':>6}"
    )
    for n in [1_000, 4_000, 16_000, 32_000, 65_536, 131_072, 262_144, 1_000_000]:
        a = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        addrs = np.array([a.ctypes.data], np.int64)
        sizes = np.array([n], np.int64)
        like = np.empty(0, np.float32)
        chunk = min(cfg.CHUNK, max(1, n // 2))  # let the parallel twin split small arrays too
        clip = {
            par: (lambda k=kernel("arr_clip", par): k(a, a, 2, 2.0, np.inf, 1e-6, True, chunk))
            for par in (False, True)
        }
        norm = {
            par: (lambda k=kernel("tab_pow_sum", par): k(addrs, sizes, like, 2, 2.0, 1.0, chunk))
            for par in (False, True)
        }
        cs, cp = median_time(clip[False]), median_time(clip[True])
        ns, np_ = median_time(norm[False]), median_time(norm[True])
        print(
            f"{n:>10} {cs * 1e6:>10.1f}us {cp * 1e6:>8.1f}us {cs / cp:>6.2f}   "
            f"{ns * 1e6:>10.1f}us {np_ * 1e6:>8.1f}us {ns / np_:>6.2f}"
        )
    print(f"\ncurrent PARALLEL_MIN_ELEMENTS = {cfg.PARALLEL_MIN_ELEMENTS}")


if __name__ == "__main__":
    main()
