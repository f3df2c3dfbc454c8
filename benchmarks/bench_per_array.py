"""What ``per_array=True`` costs: each array's norm from the global-norm pass.

    unset OPENBLAS_CORETYPE; python benchmarks/bench_per_array.py [--repeat 9]

Float32 NumPy arrays, (b) GPT-2 small's 148 parameter tensors (124M values)
and (c) 2,000 arrays of 1,000 values.  Interleaved and repeated, medians:

* ``global_norm``, ``global_norm(per_array=True)``, and the separate way:
  ``global_norm`` then ``fastclip.norm`` of each array (a second read);
* in place, ``clip_by_global_norm_`` with and without ``per_array`` (max_norm
  large, so the data keeps its values from call to call).

Ratios are to the plain call of the same row group, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import fastclip
from fastclip._bench.workloads import gpt2_shapes


def time_interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median seconds per call; each round runs every function once (or a block of
    calls lasting >= 1 ms), in order, so drifts in machine load hit all alike."""
    inner = {}
    for k, fn in fns.items():
        fn()  # warm-up: compiles
        t0 = time.perf_counter()
        fn()
        inner[k] = max(1, int(1e-3 / max(time.perf_counter() - t0, 1e-9)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                fn()
            times[k].append((time.perf_counter() - t0) / inner[k])
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    work = {
        "(b) GPT-2 small, 148 tensors": gpt2_shapes(768, 12),
        "(c) 2,000 x 1,000": [(1_000,)] * 2_000,
    }
    print(f"{'workload':<30} {'call':<44} {'median':>10} {'ratio':>7}")
    for name, shapes in work.items():
        arrays = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        groups = {
            "norm": {
                "global_norm": lambda: fastclip.global_norm(arrays),
                "global_norm(per_array=True)": lambda: fastclip.global_norm(arrays, per_array=True),
                "global_norm + norm of each (separately)": lambda: (
                    fastclip.global_norm(arrays),
                    [fastclip.norm(a) for a in arrays],
                ),
            },
            "clip": {
                "clip_by_global_norm_": lambda: fastclip.clip_by_global_norm_(arrays, 1e30),
                "clip_by_global_norm_(per_array=True)": lambda: fastclip.clip_by_global_norm_(
                    arrays, 1e30, per_array=True
                ),
            },
        }
        for fns in groups.values():
            medians = time_interleaved(fns, args.repeat)
            base = next(iter(medians.values()))
            for k, t in medians.items():
                print(f"{name:<30} {k:<44} {t * 1e3:>8.2f} ms {t / base:>6.2f}x")
        print()


if __name__ == "__main__":
    main()
