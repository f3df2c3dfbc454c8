"""Issue 16, targets (a) and (b): the norm taken during backward, and what the clip costs.

    env -u OPENBLAS_CORETYPE python benchmarks/bench_backward_norm.py [--rounds 9]
        [--part gpt2|train|hooks] [--small]

``--part gpt2`` (target a): GPT-2 small's 148 parameter tensors (124M float32).
Backward is real autograd on a cheap graph (``loss = sum((p * w).sum())``, so
AccumulateGrad writes every gradient once, in reverse order, as a model's
backward does, without a model's arithmetic).  Forms, each with its own
parameters and state, timed in rotating order, medians over rounds:

* ``torch AdamW(fused)``: no clipping (the reference);
* ``torch clip + AdamW(fused)``: ``clip_grad_norm_`` then the step;
* ``FusedAdamW(max_norm)``: fastclip's norm pass inside the step;
* ``FusedAdamW(norm_in_backward)``: hooks on the tensors of at least
  ``BACKWARD_HOOK_MIN_NUMEL`` values, the rest measured in one pass at the step;
* ``... hooks on all``: every parameter hooked.

Reported: backward, step, and backward + step, each against the reference:
target (a) is the step within 1.05x, with the backward's extra time counted.

``--part train`` (target b): the ``fastclip bench --workloads train`` model,
one whole step (forward, backward, clip, AdamW) per form, split into forward,
backward and step, so the clip's cost shows where it lands.

``--part hooks``: why small gradients get no hook: fastclip's norm of a
256-value gradient inside a post-accumulate-grad hook against outside one.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_core import gpt2_small_shapes

import fastclip._config as cfg
import fastclip.torch as fct
from fastclip._bench import train as T


def _med(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def _rounds(forms: dict[str, Callable[[], tuple[float, ...]]], rounds: int) -> dict[str, Any]:
    """Run each form once per round (rotating order); per-phase samples in seconds."""
    names = list(forms)
    for f in forms.values():  # warm-up: compile, allocate state
        f()
    out: dict[str, list[tuple[float, ...]]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            out[k].append(forms[k]())
    return out


def _table(samples: dict[str, Any], phases: tuple[str, ...], ref: str) -> None:
    med = {k: [_med([s[i] for s in v]) for i in range(len(phases))] for k, v in samples.items()}
    head = "".join(f"{p + ' ms':>14s}" for p in phases)
    print(f"{'form':34s}{head}   " + "  ".join(f"{p}/ref" for p in phases))
    for k, m in med.items():
        ratios = "  ".join(f"{a / b:>{len(p) + 4}.3f}" for a, b, p in zip(m, med[ref], phases))
        print(f"{k:34s}" + "".join(f"{x:14.2f}" for x in m) + "   " + ratios)


# ------------------------------------------------------------------ (a) GPT-2 small


def part_gpt2(rounds: int, small: bool) -> None:
    shapes = gpt2_small_shapes()
    if small:
        shapes[0] = (5_000, 768)
    torch.manual_seed(0)
    ws = [torch.randn(s) * 1e-3 for s in shapes]  # the gradients backward writes (norm ~11)

    def form(kind: str) -> Callable[[], tuple[float, ...]]:
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        old = cfg.BACKWARD_HOOK_MIN_NUMEL
        if kind == "hooks-all":
            cfg.BACKWARD_HOOK_MIN_NUMEL = 0
        opt: Any
        if kind.startswith("torch"):
            opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
        elif kind == "pass":
            opt = fct.FusedAdamW(params, lr=1e-6, max_norm=1.0)
        else:
            opt = fct.FusedAdamW(params, lr=1e-6, max_norm=1.0, norm_in_backward=True)
        cfg.BACKWARD_HOOK_MIN_NUMEL = old
        clip = kind == "torch-clip"

        def run() -> tuple[float, ...]:
            loss = sum((p * w).sum() for p, w in zip(params, ws))
            t0 = time.perf_counter()
            loss.backward()  # type: ignore[union-attr]
            t1 = time.perf_counter()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            return t1 - t0, t2 - t1, t2 - t0

        return run

    forms = {
        "torch AdamW(fused)": form("torch"),
        "torch clip + AdamW(fused)": form("torch-clip"),
        "FusedAdamW(max_norm)": form("pass"),
        "FusedAdamW(norm_in_backward)": form("hooks"),
        "FusedAdamW(norm_in_backward), all": form("hooks-all"),
    }
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"GPT-2 small shapes: {len(shapes)} tensors, {n / 1e6:.1f}M float32; {rounds} rounds")
    _table(_rounds(forms, rounds), ("backward", "step", "bwd+step"), "torch AdamW(fused)")


# ------------------------------------------------------------------ (b) whole step


def part_train(rounds: int) -> None:
    base = T.gpt_model(0)
    idx = T.batch(1)
    vocab = T.MODEL["vocab"]

    def form(name: str) -> Callable[[], tuple[float, ...]]:
        model = copy.deepcopy(base)
        params = list(model.parameters())
        opt: Any
        if name.startswith("torch"):
            opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        elif name == "fastclip-torch":
            opt = fct.FusedAdamW(params, lr=1e-4, max_norm=T.MAX_NORM, norm_in_backward=True)
        elif name == "fastclip-pass":
            opt = fct.FusedAdamW(params, lr=1e-4, max_norm=T.MAX_NORM)
        else:
            opt = fct.FusedAdamW(params, lr=1e-4)
        clip = name == "torch-fused"

        def run() -> tuple[float, ...]:
            t0 = time.perf_counter()
            logits = model(idx)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, vocab), idx[:, 1:].reshape(-1)
            )
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, T.MAX_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            return t1 - t0, t2 - t1, t3 - t2, t3 - t0

        return run

    names = ["torch-fused-noclip", "torch-fused", "fastclip-noclip", "fastclip-pass"]
    names.append("fastclip-torch")
    print(f"train model {T.MODEL}; {rounds} rounds")
    samples = _rounds({k: form(k) for k in names}, rounds)
    _table(samples, ("forward", "backward", "step", "total"), "torch-fused-noclip")


# ------------------------------------------------------------------ hooks


def part_hooks(rounds: int) -> None:
    from fastclip.torch._backward_norm import _norm_of

    base = T.gpt_model(0)
    idx = T.batch(1)
    inside: list[float] = []

    def hook(p: torch.Tensor) -> None:
        g = p.grad
        assert g is not None
        if g.numel() <= 1024:
            t = time.perf_counter()
            _norm_of([g], 2, 2.0, 2.0)
            inside.append(time.perf_counter() - t)

    for p in base.parameters():
        p.register_post_accumulate_grad_hook(hook)
    vocab = T.MODEL["vocab"]
    for _ in range(rounds):
        base.zero_grad(set_to_none=True)
        logits = base(idx)
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), idx[:, 1:].reshape(-1)
        ).backward()
    small = [p.grad for p in base.parameters() if p.grad is not None and p.numel() <= 1024]
    outside = []
    for _ in range(rounds):
        for g in small:
            t = time.perf_counter()
            _norm_of([g], 2, 2.0, 2.0)
            outside.append(time.perf_counter() - t)
    print(
        f"norm of a gradient of <= 1024 values: inside a hook {_med(inside) * 1e3:.0f} us, "
        f"outside {_med(outside) * 1e3:.0f} us (medians of {len(inside)} and {len(outside)})"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--part", choices=("gpt2", "train", "hooks", "all"), default="all")
    ap.add_argument("--small", action="store_true", help="gpt2: wte 5,000 rows, not 50,257")
    args = ap.parse_args(argv)
    if args.part in ("hooks", "all"):
        part_hooks(args.rounds)
    if args.part in ("train", "all"):
        part_train(args.rounds)
    if args.part in ("gpt2", "all"):
        part_gpt2(args.rounds, args.small)


if __name__ == "__main__":
    main()
