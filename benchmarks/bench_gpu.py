"""Issue 3's GPU speed check: float32 in-place global-norm clipping on CUDA tensors.

    python benchmarks/bench_gpu.py [--json PATH]

(a) one 2**28-element array, (b) GPT-2 small's 148 tensors, (c) GPT-2 XL's
shapes (1.5B values), (d) 10,000 tensors of 4,096 values: fastclip against
``torch.nn.utils.clip_grad_norm_(foreach=True)`` on the same tensors and naive
CuPy (``cupy.linalg.norm`` per array, then multiply), CUDA-event timing after
warm-up, medians, each as a fraction of the floor: 2 reads + 1 write at the
device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import cupy
import torch

import fastclip
from fastclip._bench.workloads import gpt2_shapes


def cuda_time(fn: Any, repeat: int) -> list[float]:
    for _ in range(3):
        fn()
    out = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def copy_bandwidth(repeat: int) -> float:
    a = torch.empty(2**28, device="cuda")
    b = torch.empty_like(a)
    t = statistics.median(cuda_time(lambda: b.copy_(a), repeat))
    return 2 * a.nbytes / t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bw = copy_bandwidth(args.repeat)
    print(f"{torch.cuda.get_device_name()}  device-to-device copy: {bw / 1e9:.0f} GB/s")
    workloads = {
        "(a) 1 x 2**28": [(2**28,)],
        "(b) GPT-2 small": gpt2_shapes(768, 12),
        "(c) GPT-2 XL": gpt2_shapes(1600, 48),
        "(d) 10,000 x 4,096": [(4096,)] * 10_000,
    }
    results = []
    for name, shapes in workloads.items():
        grads = [torch.randn(s, device="cuda") for s in shapes]
        params = [torch.nn.Parameter(torch.empty(0, device="cuda")) for _ in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        cp = [cupy.from_dlpack(g) for g in grads]
        nbytes = sum(g.nbytes for g in grads)
        floor = 3 * nbytes / bw
        inf = float("inf")

        def naive_cupy() -> None:
            total = cupy.linalg.norm(cupy.stack([cupy.linalg.norm(a) for a in cp]))
            coef = cupy.minimum(1.0, 1.0 / (total + 1e-6))
            for a in cp:
                a *= coef.astype(a.dtype)

        fns = {
            "fastclip (torch tensors)": lambda: fastclip.clip_by_global_norm_(grads, inf),
            "fastclip (cupy arrays)": lambda: fastclip.clip_by_global_norm_(cp, inf),
            "torch clip_grad_norm_ foreach": lambda: torch.nn.utils.clip_grad_norm_(
                params, inf, foreach=True
            ),
            "cupy naive": naive_cupy,
        }
        med = {k: statistics.median(cuda_time(f, args.repeat)) for k, f in fns.items()}
        for k, m in med.items():
            row = {
                "workload": name,
                "impl": k,
                "median_s": m,
                "of_floor": floor / m,
                "vs_torch": med["torch clip_grad_norm_ foreach"] / m,
            }
            results.append(row)
            print(
                f"{name:<20} {k:<30} {m * 1e3:9.3f} ms {floor / m:6.0%} of floor "
                f"{row['vs_torch']:6.2f}x vs torch"
            )
        fns.clear()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "copy_bandwidth": bw,
                    "torch": torch.__version__,
                    "cupy": cupy.__version__,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
