"""Issue 5's speed check: global-norm clip + AdamW step on GPT-2 small's shapes, float32, CPU.

    python benchmarks/bench_optim.py [--repeat 7] [--small]

GPT-2 small's 148 parameter tensors (124M float32 values: wte 50257x768, wpe
1024x768, 12 blocks of ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj, ln_f).
Compared, interleaved step by step and repeated (medians reported):

* ``fastclip FusedAdamW(max_norm=1)``: the core's multi-tensor norm kernel
  (one read of g), then one fused kernel (reads p, g, m, v; writes p, m, v);
* ``fastclip adamw_step_``: the same kernels through the functional API;
* ``torch clip_grad_norm_(foreach=True) + AdamW(foreach=True)``;
* ``torch clip_grad_norm_(foreach=True) + AdamW(fused=True)`` (where the CPU
  supports it).

The floor is the fused step's own bytes, 8 x 4 bytes per element (g read for
the norm; p, g, m, v read and p, m, v written by the update) at the read+write
bandwidth measured in the same run (a parallel in-place scale of 256 MiB, as
``bench_core.py``).  The gradients are scaled so that their norm is below
``max_norm``: the coefficient is then 1 and repeated steps keep the data
stable; both torch (which always multiplies by the clamped coefficient) and
fastclip (which always multiplies inside the update) do the same work for any
coefficient.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numba
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_core import copy_bandwidth, gpt2_small_shapes

from fastclip.optim import adamw_step_
from fastclip.torch import FusedAdamW


def make_params(shapes: list[tuple[int, ...]], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    params: list[torch.Tensor] = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g  # shared: fastclip only reads it; torch's clip multiplies it by 1.0
    return params


def torch_fused_available() -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.zeros(4)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="wte 5,000 rows instead of 50,257")
    args = ap.parse_args(argv)
    shapes = gpt2_small_shapes()
    if args.small:
        shapes[0] = (5_000, 768)
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    torch.manual_seed(0)
    grads = [torch.randn(s) * 1e-5 for s in shapes]  # global norm ~0.11 < max_norm = 1
    print(
        f"{len(shapes)} tensors, {n / 1e6:.1f}M float32; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numba {numba.__version__} "
        f"({numba.get_num_threads()} threads)"
    )

    contenders: dict[str, Callable[[], object]] = {}
    p_fc = make_params(shapes, grads)
    opt_fc = FusedAdamW(p_fc, lr=1e-4, weight_decay=0.1, max_norm=1.0)
    contenders["fastclip FusedAdamW(max_norm)"] = opt_fc.step

    p_fn = [p.detach() for p in make_params(shapes, grads)]
    m_fn = [torch.zeros_like(p) for p in p_fn]
    v_fn = [torch.zeros_like(p) for p in p_fn]
    step_fn = [0]

    def functional() -> object:
        step_fn[0] += 1
        return adamw_step_(
            p_fn, grads, m_fn, v_fn, step=step_fn[0], lr=1e-4, weight_decay=0.1, max_norm=1.0
        )

    contenders["fastclip adamw_step_ (functional)"] = functional

    p_fe = make_params(shapes, grads)
    opt_fe = torch.optim.AdamW(p_fe, lr=1e-4, weight_decay=0.1, foreach=True)

    def torch_foreach() -> object:
        torch.nn.utils.clip_grad_norm_(p_fe, 1.0, foreach=True)
        return opt_fe.step()

    contenders["torch clip_grad_norm_ + AdamW(foreach)"] = torch_foreach
    if torch_fused_available():
        p_fu = make_params(shapes, grads)
        opt_fu = torch.optim.AdamW(p_fu, lr=1e-4, weight_decay=0.1, fused=True)

        def torch_fused() -> object:
            torch.nn.utils.clip_grad_norm_(p_fu, 1.0, foreach=True)
            return opt_fu.step()

        contenders["torch clip_grad_norm_ + AdamW(fused)"] = torch_fused
    else:
        print("torch AdamW(fused=True) is not supported on this CPU build; skipped")

    for fn in contenders.values():  # warm-up: compile, allocate state
        fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    bws: list[float] = []
    for _ in range(args.repeat):
        bws.append(copy_bandwidth(3))
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    bw = statistics.median(bws)
    floor = 8 * 4 * n / bw
    print(
        f"read+write bandwidth {bw / 1e9:.1f} GB/s (median of {len(bws)}); floor {floor * 1e3:.1f} ms"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    best_torch = min(v for k, v in med.items() if k.startswith("torch"))
    print(
        f"{'contender':42s} {'median ms':>10s} {'min ms':>8s} {'vs best torch':>14s} {'of floor':>9s}"
    )
    for name, t in med.items():
        print(
            f"{name:42s} {t * 1e3:10.1f} {min(times[name]) * 1e3:8.1f} "
            f"{best_torch / t:13.2f}x {floor / t:9.2f}"
        )


if __name__ == "__main__":
    main()
