"""Value clipping against torch's ``clamp_``: one big array, a few, many small ones.

    unset OPENBLAS_CORETYPE; python benchmarks/bench_value.py

Float32 CPU tensors, in place, clamped to [-1, 1] (a standard normal: about a
third of the values change). Each layout is timed interleaved in one process:
``fastclip.torch.clip_grad_value_`` (the drop-in), ``fastclip.clip_by_value_``
on the tensors (one array: the array API's call; a list: one launch for all),
fastclip's bare kernel (``arr_clamp``, or ``tab_clamp`` on a table packed
before the timing: no Python around it),
``torch.nn.utils.clip_grad_value_`` (on the CPU its default is the loop of
``clamp_`` calls) and with ``foreach=True``. Medians of ``--rounds``; each
line gives the times and torch's loop / fastclip's drop-in (>1: fastclip faster).
A last line times the table packing of the 148 tensors (addresses, sizes,
dtypes, overlap check) warm and right after a 40 MB in-place pass, which
leaves the Python side's code and objects out of the caches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import fastclip
import fastclip.torch as fct
from fastclip import _config as cfg
from fastclip._cpu._adapters import TorchLib
from fastclip._cpu._launch import run
from fastclip._cpu._pack import pack

LAYOUTS = {  # name -> sizes of the tensors
    "1 x 1e5": [10**5],
    "1 x 1e7": [10**7],
    "2 x 5e6": [5 * 10**6] * 2,
    "10 x 1e5": [10**5] * 10,
    "148 x GPT-2 small / 8": [n // 8 for n in [2304 * 768] * 12 + [768 * 3072] * 24 + [768] * 112],
}


def _cases(sizes: list[int]) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.numel(), generator=gen)
    grads = [p.grad for p in params]
    cases: dict[str, Callable[[], object]] = {
        "fastclip.torch": lambda: fct.clip_grad_value_(params, 1.0),
        "clip_by_value_": lambda: fastclip.clip_by_value_(
            grads[0] if len(grads) == 1 else grads, -1.0, 1.0
        ),
    }
    if len(grads) == 1:
        a = grads[0].numpy()
        cases["bare kernel"] = lambda: run("arr_clamp", a.size, a, a, -1.0, 1.0, True, cfg.CHUNK)
    else:
        t = pack(TorchLib, grads, "clip_by_value", writing=True).tables[0]
        args = (t.addrs, t.addrs, t.sizes, t.like, -1.0, 1.0, True, cfg.CHUNK)
        cases["bare kernel"] = lambda: run("tab_clamp", t.n, *args)
    cases["torch loop"] = lambda: torch.nn.utils.clip_grad_value_(params, 1.0, foreach=False)
    cases["torch foreach"] = lambda: torch.nn.utils.clip_grad_value_(params, 1.0, foreach=True)
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=41)
    args = ap.parse_args()
    for name, sizes in LAYOUTS.items():
        cases = _cases(sizes)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for f in cases.values():
            f()
        for _ in range(args.rounds):
            for k, f in cases.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        cells = "; ".join(f"{k} {v:,.1f} us" for k, v in med.items())
        ratio = med["torch loop"] / med["fastclip.torch"]
        print(f"{name} ({np.sum(sizes):,} floats): {cells}; torch loop / drop-in {ratio:.2f}x")
    _pack_cost(LAYOUTS["148 x GPT-2 small / 8"], args.rounds)


def _pack_cost(sizes: list[int], rounds: int) -> None:
    grads = [torch.randn(n) for n in sizes]
    big = torch.randn(10**7)
    warm: list[float] = []
    cold: list[float] = []
    for _ in range(rounds):
        pack(TorchLib, grads, "clip_by_value", writing=True)
        t0 = time.perf_counter()
        pack(TorchLib, grads, "clip_by_value", writing=True)
        warm.append(time.perf_counter() - t0)
        big.mul_(1.0)  # streams 40 MB through the caches
        t0 = time.perf_counter()
        pack(TorchLib, grads, "clip_by_value", writing=True)
        cold.append(time.perf_counter() - t0)
    w, c = statistics.median(warm) * 1e6, statistics.median(cold) * 1e6
    print(f"packing {len(sizes)} tensors: warm {w:.0f} us, right after a 40 MB pass {c:.0f} us")


if __name__ == "__main__":
    main()
