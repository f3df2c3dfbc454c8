"""A rank's local norm in ``fastclip.distributed`` (every element accumulated in
float64, so the norm does not depend on the split) against the alternatives, CPU,
in one run.

    python benchmarks/bench_distributed_local.py [--repeat 21] [--layers 2] [--threads 1]

Shapes: GPT-2 small's tensors (hidden 768, ``--layers`` blocks, a 6500 x 768
embedding: 28 tensors, 20.0M values), float32 and bfloat16.  Methods:

* ``fastclip wide`` -- what ``fastclip.distributed`` runs now: the CPU route's
  float64-accumulating kernels (``fastclip/_cpu/_wide_kernels.py``);
* ``torch widen+dot`` -- what it ran before: chunks copied into a float64 buffer,
  then ``torch.dot`` (still the route of CUDA tensors);
* ``fastclip blocks`` -- ``fastclip.global_norm``'s kernels (float32 blocks, then
  float64: faster, but split-dependent in the last float32 bits);
* ``torch foreach_norm`` -- ``torch._foreach_norm`` then a norm of the norms, as
  ``torch.nn.utils.clip_grad_norm_`` computes it (in the data's dtype).

``--threads 1`` (the default) runs torch on one thread and fastclip's kernels
serially; ``--threads 2`` lets both use two.  Rounds are interleaved; reported:
the median and interquartile range per method, and each median over
``fastclip wide``'s.  The machine may be busy: compare ratios of one run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from fastclip import _config, _dispatch
from fastclip.distributed import _local


def gpt2_shapes(layers: int, vocab: int = 6500, d: int = 768) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


def methods(grads: list[torch.Tensor]) -> dict[str, Callable[[], float]]:
    def old() -> float:
        norms = torch.stack([_local._widened_norm(g, 2, 2.0) for g in grads])
        return float(_local.combine(norms, 2, 2.0))

    def foreach() -> float:
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0))))

    route = _dispatch.backend_for(grads)
    return {
        "fastclip wide": lambda: float(_local.local_norm(grads, 2, 2.0)),
        "torch widen+dot": old,
        "fastclip blocks": lambda: float(route.norm64(grads, 2, 2.0)),
        "torch foreach_norm": foreach,
    }


def run(dtype: torch.dtype, args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to(dtype) for s in gpt2_shapes(args.layers)]
    n = sum(g.numel() for g in grads)
    funcs = methods(grads)
    ref = math.sqrt(math.fsum(float(g.double().pow(2).sum()) for g in grads))
    times: dict[str, list[float]] = {k: [] for k in funcs}
    for name, f in funcs.items():  # warm-up (compiles) and a value check
        for _ in range(2):
            value = f()
        print(f"  {name:20s} norm {value:.9g} (float64 reference {ref:.9g})")
    for _ in range(args.repeat):
        for name, f in funcs.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["fastclip wide"])
    print(f"{str(dtype).removeprefix('torch.')}, {len(grads)} tensors, {n / 1e6:.1f}M values:")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        gbs = n * grads[0].element_size() / med / 1e9
        print(
            f"  {name:20s} {med * 1e3:8.2f} ms  (IQR {q[0] * 1e3:.2f}-{q[2] * 1e3:.2f})"
            f"  {gbs:6.2f} GB/s read  {med / base:5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _config.THREADS = "serial" if args.threads == 1 else "parallel"
    for dtype in (torch.float32, torch.bfloat16):
        run(dtype, args)


if __name__ == "__main__":
    main()
