"""One optimizer step of SPAM and Stable-SPAM, fused route vs ``_foreach`` route, against
``torch.optim.AdamW(foreach=True)`` (the unclipped baseline), float32, CPU, in one run.

    python benchmarks/bench_spam.py [--repeat 15] [--layers 2] [--vocab 6500] [--threads 1]

Shapes: GPT-2 small's tensors (hidden 768) with ``--layers`` blocks and a
``--vocab`` x 768 embedding: the defaults give 28 tensors, 20.0M float32 values
(the full model, 124M, is too slow for a shared 2-core machine).  Every
optimizer steps the same parameters and gradients (timing only) and keeps its
own moments.  SPAM runs with ``grad_accu_steps=2``, so its spike clipping is on
from the second step (the timed steps all clip; with the same gradients every
step no entry exceeds the threshold, as in steady training); Stable-SPAM with
its defaults.  (``grad_accu_steps`` 0 or 1 would clip the first step against
v = 0: every entry to 0, v stays 0, and every later step clips every entry.)

``--threads 1`` (the default) runs torch on one thread and fastclip's kernels
serially (``fastclip._config.THREADS = "serial"``): on a shared machine both
libraries' OpenMP pools lose whole time slices to other processes (see
``fastclip/_cpu/_launch.py``), which swamps the comparison; ``--threads 2``
lets both use two.

Rounds are interleaved (one step of each method per round, after two warm-up
steps that also compile the kernels); reported: the median and the
interquartile range per method, and each median over AdamW's.  The machine
may be busy: compare the ratios of one run, not times across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fastclip.torch import SPAMAdamW, StableSPAMAdamW


def gpt2_shapes(layers: int, vocab: int, d: int = 768) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


def methods(params: list[torch.nn.Parameter]) -> dict[str, Callable[[], None]]:
    spam = dict(lr=1e-4, weight_decay=0.1, grad_accu_steps=2)
    stable = dict(lr=1e-4, weight_decay=0.1)
    opts = {
        "AdamW(foreach=True)": torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True),
        "SPAMAdamW fused": SPAMAdamW(params, **spam, fused=True),
        "SPAMAdamW foreach": SPAMAdamW(params, **spam, fused=False),
        "StableSPAMAdamW fused": StableSPAMAdamW(params, **stable, fused=True),
        "StableSPAMAdamW foreach": StableSPAMAdamW(params, **stable, fused=False),
    }
    return {name: opt.step for name, opt in opts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=6500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.threads == 1:
        from fastclip import _config

        _config.THREADS = "serial"
    torch.manual_seed(0)
    shapes = gpt2_shapes(args.layers, args.vocab)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    total = sum(p.numel() for p in params)
    steps = methods(params)
    for _ in range(2):  # warm-up: state allocation and kernel compilation
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeat):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    print(
        f"{len(shapes)} tensors, {total / 1e6:.1f}M float32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, {args.repeat} interleaved rounds"
    )
    base = statistics.median(times["AdamW(foreach=True)"])
    print(f"{'method':26s} {'median ms':>10s} {'IQR ms':>16s} {'/ AdamW':>8s}")
    for name, ts in times.items():
        q1, med, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (ts[0],) * 3
        med = statistics.median(ts)
        print(f"{name:26s} {med * 1e3:10.2f} {q1 * 1e3:7.2f}-{q3 * 1e3:<8.2f} {med / base:8.2f}")
    for kind in ("SPAMAdamW", "StableSPAMAdamW"):
        fused = statistics.median(times[f"{kind} fused"])
        each = statistics.median(times[f"{kind} foreach"])
        print(f"{kind}: foreach / fused = {each / fused:.2f}")


if __name__ == "__main__":
    main()
