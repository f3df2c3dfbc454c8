"""Why a two-pass clip cannot reach 90% of the copy-bandwidth floor on this machine.

    unset OPENBLAS_CORETYPE; python benchmarks/bench_read_cap.py [--repeat 9]

Global-norm clipping reads the data once for the norm, then reads and writes
it once to scale.  ``fastclip bench`` and ``bench_core.py`` count the floor as
3 passes at the *copy* bandwidth (a parallel in-place scale of 256 MiB).  When
reads alone stream slower than that, the best any two-pass clip can reach is

    cap = (3 / copy) / (1 / read + 2 / copy)

This script measures, interleaved, on 1 GiB of float32 (out of cache):

* the copy bandwidth, by the benches' own probe;
* the read bandwidth of fastclip's norm kernel (``arr_pow_sum``, parallel);
* the same sum read as 2, 4 or 8 interleaved streams per thread (more
  prefetch streams in flight), to see whether another read loop is faster;

and prints the cap.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np

from fastclip import _config as cfg
from fastclip._bench import timing
from fastclip._cpu import kernel

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(fastmath=FASTMATH, inline="always")
def _block(s):  # type: ignore[no-untyped-def]
    acc = np.float32(0)
    for i in range(s.size):
        acc += s[i] * s[i]
    return acc


@numba.njit(parallel=True, fastmath=FASTMATH)
def _streams(x, k, blk):  # type: ignore[no-untyped-def]
    """Sum of squares; each thread reads its half as ``k`` interleaved streams."""
    per = x.size // 2
    part = np.zeros(2)
    for t in numba.prange(2):
        base = t * per
        length = per // k
        acc = 0.0
        for b in range(0, length, blk):
            for j in range(k):
                o = base + j * length + b
                acc += _block(x[o : o + blk])
        part[t] = acc
    return part.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal(1 << 28, dtype=np.float32)  # 1 GiB
    norm = kernel("arr_pow_sum", True)
    reads = {
        "fastclip norm kernel": lambda: norm(x, 2, 2.0, 1.0, cfg.CHUNK),
        "2 streams per thread": lambda: _streams(x, 2, 4096),
        "4 streams per thread": lambda: _streams(x, 4, 4096),
        "8 streams per thread": lambda: _streams(x, 8, 4096),
    }
    for fn in reads.values():
        fn()  # compile
    times: dict[str, list[float]] = {k: [] for k in reads}
    copies = []
    for _ in range(args.repeat):
        for name, fn in reads.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        copies.append(timing.host_bandwidth(3)["bytes_per_s"])
    copy = statistics.median(copies) / 1e9
    print(f"numba {numba.__version__}, {numba.get_num_threads()} threads; 1 GiB float32")
    print(f"copy bandwidth (the floor's probe): {copy:.1f} GB/s read+write")
    for name, ts in times.items():
        read = x.nbytes / statistics.median(ts) / 1e9
        cap = (3 / copy) / (1 / read + 2 / copy)
        print(f"{name:<22} read {read:5.1f} GB/s -> two-pass clip cap {cap:4.0%} of the floor")


if __name__ == "__main__":
    main()
