"""Eager per-call cost of ``fastclip.torch.clip_grad_norm_`` before and after the
torch.compile entry check (``torch.compiler.is_compiling()`` at the top of each
public function, routing to a custom operator only while Dynamo traces).

    python benchmarks/bench_compile_overhead.py [--before main] [--rounds 15]

"Before" is ``fastclip/torch/_clip_grad.py`` as it is at the git revision
``--before`` (default ``main``), loaded as a sibling module of the current
package so that both versions run on the same kernels in one process.  The
two are interleaved (the order alternates every round); each round times a
batch of calls of each; the medians over the rounds and their ratio are
printed, for 1 tensor and for 2,000 tensors of 1,000 float32 values.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from types import ModuleType

import torch

import fastclip.torch as fct

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_before(rev: str) -> ModuleType:
    """``fastclip/torch/_clip_grad.py`` at ``rev``, as module ``fastclip.torch._clip_grad_before``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:fastclip/torch/_clip_grad.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = "fastclip.torch._clip_grad_before"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "fastclip.torch"
    sys.modules[name] = module
    exec(compile(source, f"{rev}:fastclip/torch/_clip_grad.py", "exec"), module.__dict__)
    return module


def per_call(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def compare(params: list[torch.Tensor], before: ModuleType, rounds: int, calls: int) -> None:
    new = lambda: fct.clip_grad_norm_(params, 1e9)  # noqa: E731  (no scaling below 1e9)
    old = lambda: before.clip_grad_norm_(params, 1e9)  # noqa: E731
    assert torch.equal(new(), old())
    for fn in (new, old):  # warm: kernels compiled, address tables cached
        per_call(fn, calls)
    times: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(rounds):
        pair = [("after", new), ("before", old)]
        for label, fn in pair if r % 2 else pair[::-1]:
            times[label].append(per_call(fn, calls))
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    print(
        f"{len(params):5d} tensors: before {b * 1e6:9.2f} us  after {a * 1e6:9.2f} us  "
        f"after/before {a / b:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="git revision of the baseline")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    before = load_before(args.before)
    check = per_call(torch.compiler.is_compiling, 100_000)
    print(f"torch.compiler.is_compiling(): {check * 1e9:.0f} ns per call")
    for n, calls in ((1, 2000), (2000, 20)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.empty(1000)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn(1000)
        compare(params, before, args.rounds, calls)


if __name__ == "__main__":
    main()
