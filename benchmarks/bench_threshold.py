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
from fastclip._cpu import kernel


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
    single_calls()
    print(f"\ncurrent PARALLEL_MIN_ELEMENTS = {cfg.PARALLEL_MIN_ELEMENTS}")


def single_calls(repeat: int = 200) -> None:
    """One ``clip_by_norm_`` call at a time, as in training: each starts from fresh
    data (a copy in cache) and pays the worker threads' wake-up; serial, parallel
    (the threshold patched) and NumPy interleaved, medians."""
    import fastclip

    print("\nsingle API calls, float32 in place (median us): serial / parallel / NumPy")
    saved = cfg.PARALLEL_MIN_ELEMENTS
    try:
        for n in (50_000, 100_000, 150_000, 200_000, 300_000):
            base = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
            x = base.copy()
            times: dict[str, list[float]] = {"serial": [], "parallel": [], "numpy": []}
            for threshold in (10**12, 1):
                cfg.PARALLEL_MIN_ELEMENTS = threshold
                fastclip.clip_by_norm_(x, 1.0)  # compile / load
            for _ in range(repeat):
                for mode, threshold in (("serial", 10**12), ("parallel", 1)):
                    cfg.PARALLEL_MIN_ELEMENTS = threshold
                    np.copyto(x, base)
                    t0 = time.perf_counter()
                    fastclip.clip_by_norm_(x, 1.0)
                    times[mode].append(time.perf_counter() - t0)
                np.copyto(x, base)
                t0 = time.perf_counter()
                x *= np.float32(min(1.0, 1.0 / (float(np.linalg.norm(x)) + 1e-6)))
                times["numpy"].append(time.perf_counter() - t0)
            med = [statistics.median(v) * 1e6 for v in times.values()]
            print(f"{n:>10} {med[0]:8.1f} {med[1]:8.1f} {med[2]:8.1f}")
    finally:
        cfg.PARALLEL_MIN_ELEMENTS = saved


if __name__ == "__main__":
    main()
