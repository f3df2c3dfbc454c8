"""Per-step cost of ``ClippedOptimizer``'s failure restore (``restore_on_error``).

    unset OPENBLAS_CORETYPE; python benchmarks/bench_clipped_optimizer.py --numel 4000000

AdamW (foreach) on 8 float32 parameters, interleaved, medians: the plain step,
``fastclip.torch.clip_grad_norm_`` + the step, and ``ClippedOptimizer`` with a
``GlobalNormClipper`` with and without ``restore_on_error`` (the copy of the
gradients and of the clipper a failed step would put back).  The learning rate is
tiny so that the parameters stay put across rounds.

    unset OPENBLAS_CORETYPE; python benchmarks/bench_clipped_optimizer.py --compiled

``--compiled`` times ``torch.compile(opt.step)`` instead, against the same compiled
step preceded by the copies a restore of a failed compiled step would need (the
clipper's attributes and the gradients, taken as the eager step takes them): what
making a failed compiled step restore would add to every successful one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import fastclip.torch as fct
from fastclip.adaptive import GlobalNormClipper
from fastclip.torch import _clipped_restore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=4_000_000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--compiled", action="store_true", help="torch.compile(opt.step), with and without copies"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = [torch.nn.Parameter(torch.randn(args.numel // 8)) for _ in range(8)]
    for p in params:
        p.grad = torch.randn_like(p)

    def adamw() -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=1e-12, foreach=True)

    plain, manual = adamw(), adamw()

    def clip_then_step() -> None:
        fct.clip_grad_norm_(params, 1e9)
        manual.step()

    if args.compiled:
        return compiled(params, adamw, args.rounds)
    cases: dict[str, Callable[[], object]] = {
        "plain AdamW step": plain.step,
        "clip_grad_norm_ + step": clip_then_step,
        "ClippedOptimizer, restore_on_error=True": fct.ClippedOptimizer(
            adamw(), GlobalNormClipper(1e9)
        ).step,
        "ClippedOptimizer, restore_on_error=False": fct.ClippedOptimizer(
            adamw(), GlobalNormClipper(1e9), restore_on_error=False
        ).step,
    }
    report(cases, args.rounds, "clip_grad_norm_ + step")


def compiled(params: list[torch.Tensor], adamw: Callable[[], torch.optim.Optimizer], rounds: int):
    """The compiled step, and the compiled step after a restore's copies."""
    plain = fct.ClippedOptimizer(adamw(), GlobalNormClipper(1e9))
    copying = fct.ClippedOptimizer(adamw(), GlobalNormClipper(1e9))
    plain_step, copying_step = torch.compile(plain.step), torch.compile(copying.step)
    kept: list[list[torch.Tensor] | None] = [None]

    def with_copies() -> None:
        _clipped_restore.clipper_snapshot(copying.clipper)
        kept[0] = _clipped_restore.copy_into(kept[0], [p.grad for p in params])
        copying_step()

    cases = {"compiled step": plain_step, "compiled step + restore copies": with_copies}
    report(cases, rounds, "compiled step")


def report(cases: dict[str, Callable[[], object]], rounds: int, base_name: str) -> None:
    for f in cases.values():
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times[base_name])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:42s} {m * 1e3:8.2f} ms  {m / base:5.2f}x {base_name}")


if __name__ == "__main__":
    main()
