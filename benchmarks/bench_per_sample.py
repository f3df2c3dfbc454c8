"""Per-sample clipping (DP-SGD): fastclip's fused CPU route vs the Opacus formula in torch.

Workload: B=256 per-sample float32 gradients of a ~1M-parameter MLP
(784-1024-256-10 with biases: 1,068,810 parameters per sample, ~1.1 GB in all).

Opacus' flat clipping written with torch ops (what ``DPOptimizer.clip_and_accumulate``
does): per-parameter per-sample norms, ``torch.stack(...).norm(dim=1)``,
``clamp(C / (norm + 1e-6), max=1)``, then ``torch.einsum("i,i...", factor, g)``
per parameter.  The two implementations are interleaved, repeated, and the
medians and their ratio are reported (the machine is shared and noisy: single runs vary by 2x).

Run:  OPENBLAS_CORETYPE= python benchmarks/bench_per_sample.py [--repeats 15] [--batch 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import fastclip as ps

SHAPES = [(784 * 1024,), (1024,), (1024 * 256,), (256,), (256 * 10,), (10,)]


def opacus_flat(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grads]
    norms = torch.stack(per_param, dim=1).norm(2, dim=1)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...", factor, g) for g in grads]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--max-norm", type=float, default=1.0)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn((args.batch, *s), generator=gen) * 0.01 for s in SHAPES]
    params = sum(np.prod(s) for s in SHAPES)
    print(
        f"B={args.batch}, {params:,} parameters per sample, float32, "
        f"{sum(g.numel() for g in grads) * 4 / 1e9:.2f} GB; torch threads {torch.get_num_threads()}"
    )

    def run_fastclip() -> list[torch.Tensor]:
        return ps.clip_per_sample(grads, args.max_norm).grads

    def run_opacus() -> list[torch.Tensor]:
        return opacus_flat(grads, args.max_norm)

    # warm-up (numba compiles on first call) and a correctness check
    a, b = run_fastclip(), run_opacus()
    for x, y in zip(a, b):
        ref = y.double()
        rel = float((x.double() - ref).norm() / ref.norm())
        assert rel < 1e-5, rel
    times: dict[str, list[float]] = {"fastclip": [], "opacus-torch": []}
    for _ in range(args.repeats):
        for name, fn in (("fastclip", run_fastclip), ("opacus-torch", run_opacus)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>13}: median {med[k]:8.1f} ms  (min {min(v) * 1e3:.1f}, max {max(v) * 1e3:.1f})")
    print(
        f"speed-up (median opacus / median fastclip): {med['opacus-torch'] / med['fastclip']:.2f}x"
    )


if __name__ == "__main__":
    main()
