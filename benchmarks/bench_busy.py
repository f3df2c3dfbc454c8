"""Issue 15, target (b): clipping on a machine whose cores are all busy with other processes.

    env -u OPENBLAS_CORETYPE python benchmarks/bench_busy.py [--rounds 41] [--busy N]

Starts ``N`` busy processes (``python -c "while True: pass"``; default: one per
CPU this process may use), waits for them to run, then interleaves, round
after round (medians reported):

* ``fastclip clip_by_norm_``: ``fastclip.clip_by_norm_(x, c)`` of one 1e6 float32 array;
* the same with ``fastclip._config.THREADS = "parallel"`` (always parallel above
  the threshold, as before the ``auto`` policy);
* ``numpy serial``: ``x *= min(1, c / (norm + eps))`` with ``np.linalg.norm``;
* ``torch clip (1 x 1e6)``: ``torch.nn.utils.clip_grad_norm_`` of the same data;
* ``fastclip.torch / torch clip_grad_norm_ (4 x 1e6)``: four 1e6-float32 gradients.

Target (b): fastclip's ``clip_by_norm_`` at most 2x NumPy's serial time, and
fastclip never slower than torch on the same tensors.  ``--busy 0`` gives the
quiet-machine figures of the same cases.  The busy processes are killed in a
``finally``, whatever happens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

import fastclip
import fastclip._config as cfg
import fastclip.torch as fct


def spawn_busy(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--busy", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--gap-ms", type=float, default=1.0, help="pause between calls")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    c = 1.0
    x = rng.standard_normal(1_000_000).astype(np.float32)
    base = x.copy()
    t1 = torch.from_numpy(x)  # the same memory
    g4 = [torch.nn.Parameter(torch.zeros(1_000_000)) for _ in range(4)]
    for p in g4:
        p.grad = torch.randn(1_000_000)

    def refill() -> None:
        np.copyto(x, base)  # norm ~1000 > c: every clip multiplies
        for p in g4:
            assert p.grad is not None
            p.grad.fill_(1.0)

    p1 = torch.nn.Parameter(torch.zeros(1_000_000))
    p1.grad = t1

    def numpy_serial() -> object:
        np.multiply(x, np.float32(min(1.0, c / (float(np.linalg.norm(x)) + 1e-6))), out=x)
        return x

    def forced_parallel() -> object:
        policy, cfg.THREADS = cfg.THREADS, "parallel"
        try:
            return fastclip.clip_by_norm_(x, c)
        finally:
            cfg.THREADS = policy

    cases: dict[str, Callable[[], object]] = {
        "fastclip clip_by_norm_ (1e6)": lambda: fastclip.clip_by_norm_(x, c),
        "fastclip, THREADS=parallel (1e6)": forced_parallel,
        "numpy serial (1e6)": numpy_serial,
        "torch clip_grad_norm_ (1e6)": lambda: torch.nn.utils.clip_grad_norm_([p1], c),
        "fastclip.torch clip_grad_norm_ (4x1e6)": lambda: fct.clip_grad_norm_(g4, c),
        "torch clip_grad_norm_ (4x1e6)": lambda: torch.nn.utils.clip_grad_norm_(g4, c),
    }
    print(f"command: python benchmarks/bench_busy.py {' '.join(argv or sys.argv[1:])}")
    print(
        f"busy processes {args.busy}; cpus usable {len(os.sched_getaffinity(0))}; torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads); load {os.getloadavg()}"
    )
    for fn in cases.values():  # warm-up: compile
        refill()
        fn()
    busy = spawn_busy(args.busy)
    try:
        time.sleep(0.5)  # let them start spinning
        times: dict[str, list[float]] = {k: [] for k in cases}
        names = list(cases)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                refill()
                time.sleep(args.gap_ms / 1e3)
                t0 = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        for proc in busy:
            proc.kill()
        for proc in busy:
            proc.wait()
    info = fastclip.info()
    print(
        f"fastclip threads: {info.get('cpu_threads', '-')}; layer {info['numba_threading_layer']}"
    )
    envs = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER", "FASTCLIP_THREADS")
    print("env: " + ", ".join(f"{k}={os.environ.get(k, '-')}" for k in envs))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'case':40s} {'median ms':>10s} {'p90 ms':>8s} {'max ms':>8s}")
    for name, t in med.items():
        v = sorted(times[name])
        print(f"{name:40s} {t * 1e3:10.3f} {v[len(v) * 9 // 10] * 1e3:8.3f} {v[-1] * 1e3:8.3f}")
    one = med["fastclip clip_by_norm_ (1e6)"] / med["numpy serial (1e6)"]
    vs_t1 = med["torch clip_grad_norm_ (1e6)"] / med["fastclip clip_by_norm_ (1e6)"]
    vs_t4 = med["torch clip_grad_norm_ (4x1e6)"] / med["fastclip.torch clip_grad_norm_ (4x1e6)"]
    print(f"(b) fastclip clip_by_norm_ / numpy serial     {one:6.2f}x  (target <= 2)")
    print(f"(b) torch / fastclip, 1 x 1e6                 {vs_t1:6.2f}x  (target >= 1)")
    print(f"(b) torch / fastclip.torch, 4 x 1e6           {vs_t4:6.2f}x  (target >= 1)")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
