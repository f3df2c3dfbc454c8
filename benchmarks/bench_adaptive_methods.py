"""Speed of the adaptive methods (AdaGC, SPAM, Stable-SPAM, quantile DP clipping) against
their closest peers, interleaved in one run, float32, CPU.

    python benchmarks/bench_adaptive_methods.py [--repeat 7] [--layers 2] [--vocab 2000]

Shapes: GPT-2 small's tensors (hidden 768) with ``--layers`` blocks and a
``--vocab`` x 768 embedding (the full model, 12 layers and 50,257 rows, is
124M values: too slow for a shared 2-core machine), 16 + 12 * layers tensors.
Each method is timed against:

* AdaGC: ``fastclip.adaptive.AdaGC`` (one multi-tensor norm pass, per-tensor
  scaling only of the tensors it clips) vs the authors' loop written in torch
  (``torch.norm`` per tensor and a host comparison per tensor, as their
  Megatron ``AdaGC.clip_by_norm``) vs torch ``clip_grad_norm_(foreach=True)``;
* SPAM / Stable-SPAM: ``fastclip.torch.SPAMAdamW`` / ``StableSPAMAdamW``
  (the fused one-pass kernels, ``fused=True``, and the multi-tensor
  ``_foreach`` steps, ``fused=False``) vs the reference optimizers' per-parameter
  loops (boolean-mask indexing, written from the papers' update rules) vs torch
  ``clip_grad_norm_(foreach) + AdamW(foreach)``;
* Stable-SPAM's gradient transform alone: ``fastclip.adaptive.StableSPAMClip``
  (multi-tensor max and norm passes, per-tensor scaling) vs the reference's
  AdaClip + AdaGN lines per parameter in torch vs torch ``clip_grad_norm_(foreach)``;
* quantile clipping: ``fastclip.adaptive.QuantileClip.clip_per_sample`` vs
  Opacus' adaptive-clip arithmetic in torch (per-parameter ``view(B, -1).norm``,
  ``stack``, ``clamp``, ``einsum``, the count and the bound update), on
  per-sample gradients of a 3-layer MLP.

Medians of ``--repeat`` interleaved rounds; ratios are within one run (the
machine may be busy: compare the ratios, not the times, across runs).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from fastclip.adaptive import AdaGC, QuantileClip, StableSPAMClip
from fastclip.torch import SPAMAdamW, StableSPAMAdamW


def gpt2_shapes(layers: int, vocab: int, d: int = 768) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


def naive_adagc(ratio: float = 1.04, beta: float = 0.99) -> Callable[[list[torch.Tensor]], None]:
    state: dict[int, torch.Tensor] = {}

    def clip(grads: list[torch.Tensor]) -> None:
        for i, g in enumerate(grads):
            n = torch.norm(g)
            avg = state.setdefault(i, n)
            if n > ratio * avg:  # a host read per tensor, as the reference
                g.mul_(ratio * avg / (n + 1e-6))
                n = ratio * avg
            state[i] = avg * beta + n * (1 - beta)

    return clip


def naive_spam(params: list[torch.Tensor], lr: float = 1e-4, accu: int = 2) -> Callable[[], None]:
    """SPAM's per-parameter step (threshold 5000, reset every 500, ``accu`` steps unclipped)."""
    st = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), k=0) for p in params]
    count = [0]

    def step() -> None:
        count[0] += 1
        for p, s in zip(params, st):
            g = p.grad.clone()
            s["k"] += 1
            if count[0] >= accu and count[0] % 500 >= accu:
                mask = g**2 > 5000 * s["v"]
                g[mask] = g[mask].sign() * torch.sqrt(s["v"][mask] * 5000)
            s["m"].mul_(0.9).add_(g, alpha=0.1)
            s["v"].mul_(0.999).addcmul_(g, g, value=0.001)
            size = lr * math.sqrt(1 - 0.999 ** s["k"]) / (1 - 0.9 ** s["k"])
            p.data.add_(s["m"] / (s["v"].sqrt() + 1e-6), alpha=-size)

    return step


def naive_stable_spam(params: list[torch.Tensor], lr: float = 1e-4) -> Callable[[], None]:
    """Stable-SPAM's per-parameter step (gamma 0.7, 0.9, 0.999; defaults otherwise)."""
    z = lambda: torch.zeros(())  # noqa: E731
    st = [
        dict(m=torch.zeros_like(p), v=torch.zeros_like(p), k=0, a=z(), b=z(), mx=z())
        for p in params
    ]

    def step() -> None:
        for p, s in zip(params, st):
            g = p.grad.clone()
            s["k"] += 1
            k = s["k"]
            mg = g.abs().max()
            s["mx"] = 0.999 * s["mx"] + 0.001 * mg
            hat = s["mx"] / (1 - 0.999**k)
            mask = g.abs() > hat
            if mask.sum() > 0:
                g[mask] = g[mask] / mg * hat
            n = torch.norm(g)
            s["a"] = 0.7 * s["a"] + 0.3 * n
            s["b"] = 0.9 * s["b"] + 0.1 * n**2
            c = (s["a"] / (1 - 0.7**k)) / (torch.sqrt(s["b"] / (1 - 0.9**k)) + 1e-8)
            if n > 0:
                g = g / n * c
            s["m"].mul_(0.9).add_(g, alpha=0.1)
            s["v"].mul_(0.999).addcmul_(g, g, value=0.001)
            denom = (s["v"].sqrt() / math.sqrt(1 - 0.999**k)).add_(1e-8)
            p.data.add_(s["m"] / denom, alpha=-lr / (1 - 0.9**k))

    return step


def naive_stable_spam_transform() -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """The reference's gradient half (AdaClip, AdaGN) per parameter, as ``stablespam.py``:
    the masked write into the gradient, then a new tensor for the AdaGN scaling."""
    z = lambda: torch.zeros(())  # noqa: E731
    st: dict[int, dict[str, object]] = {}

    def clip(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, g in enumerate(grads):
            s = st.setdefault(i, dict(k=0, a=z(), b=z(), mx=z()))
            s["k"] = k = int(s["k"]) + 1  # type: ignore[call-overload]
            mg = g.abs().max()
            s["mx"] = 0.999 * s["mx"] + 0.001 * mg  # type: ignore[operator]
            hat = s["mx"] / (1 - 0.999**k)  # type: ignore[operator]
            mask = g.abs() > hat
            if mask.sum() > 0:
                g[mask] = g[mask] / mg * hat
            n = torch.norm(g)
            s["a"] = 0.7 * s["a"] + 0.3 * n  # type: ignore[operator]
            s["b"] = 0.9 * s["b"] + 0.1 * n**2  # type: ignore[operator]
            c = (s["a"] / (1 - 0.7**k)) / (torch.sqrt(s["b"] / (1 - 0.9**k)) + 1e-8)  # type: ignore[operator]
            out.append(g / n * c if n > 0 else g)
        return out

    return clip


def opacus_quantile(c0: float) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    bound = [c0]

    def clip(gs: list[torch.Tensor]) -> list[torch.Tensor]:
        norms = torch.stack([g.view(len(g), -1).norm(2, dim=-1) for g in gs], dim=1).norm(2, dim=1)
        f = (bound[0] / (norms + 1e-6)).clamp(max=1.0)
        unclipped = len(f) - (f < 1).sum()
        out = [torch.einsum("i,i...", f, g) for g in gs]
        bound[0] *= math.exp(-0.2 * (float(unclipped) / len(f) - 0.5))
        return out

    return clip


def timeit(contenders: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def report(title: str, med: dict[str, float]) -> None:
    first = next(iter(med.values()))
    print(f"\n{title}")
    print(f"  {'contender':46s} {'median ms':>10s} {'vs fastclip':>12s}")
    for name, t in med.items():
        print(f"  {name:46s} {t * 1e3:10.2f} {t / first:11.2f}x")


def params_like(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    ps = [torch.nn.Parameter(torch.randn(g.shape) * 0.02) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2000)
    args = ap.parse_args(argv)
    shapes = gpt2_shapes(args.layers, args.vocab)
    n = sum(math.prod(s) for s in shapes)
    torch.manual_seed(0)
    grads = [torch.randn(s) * 1e-4 for s in shapes]
    print(
        f"{len(shapes)} tensors, {n / 1e6:.1f}M float32; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    # The gradients stay fixed (their norms stable), so AdaGC's EMAs settle and it clips
    # nothing: the cost measured is the norm pass and the bookkeeping.
    ada, naive = AdaGC(warmup_steps=0), naive_adagc()
    pg = params_like(grads)
    report(
        "AdaGC (per-tensor EMA clipping)",
        timeit(
            {
                "fastclip.adaptive.AdaGC": lambda: ada(grads),
                "authors' loop in torch (norm + .item per tensor)": lambda: naive(grads),
                "torch clip_grad_norm_(foreach) (global, not AdaGC)": lambda: (
                    torch.nn.utils.clip_grad_norm_(pg, 1e9, foreach=True)
                ),
            },
            args.repeat,
        ),
    )

    # grad_accu_steps=2: the first (warm-up) call fills v, the timed ones test every entry
    # against it and, the gradients being fixed, clip none (spikes are rare in training)
    spam = SPAMAdamW(params_like(grads), lr=1e-4, grad_accu_steps=2, fused=False)
    spam_fused = SPAMAdamW(params_like(grads), lr=1e-4, grad_accu_steps=2, fused=True)
    ref = naive_spam(params_like(grads))
    pt = params_like(grads)
    adamw = torch.optim.AdamW(pt, lr=1e-4, foreach=True)

    def torch_step() -> None:
        torch.nn.utils.clip_grad_norm_(pt, 1.0, foreach=True)
        adamw.step()

    report(
        "SPAM (spike clip + Adam step)",
        timeit(
            {
                "fastclip.torch.SPAMAdamW (fused)": spam_fused.step,
                "fastclip.torch.SPAMAdamW (foreach)": spam.step,
                "reference-style per-parameter loop": ref,
                "torch clip_grad_norm_ + AdamW(foreach)": torch_step,
            },
            args.repeat,
        ),
    )

    stable = StableSPAMAdamW(params_like(grads), lr=1e-4, fused=False)
    stable_fused = StableSPAMAdamW(params_like(grads), lr=1e-4, fused=True)
    ref2 = naive_stable_spam(params_like(grads))
    report(
        "Stable-SPAM (AdaClip + AdaGN + Adam step)",
        timeit(
            {
                "fastclip.torch.StableSPAMAdamW (fused)": stable_fused.step,
                "fastclip.torch.StableSPAMAdamW (foreach)": stable.step,
                "reference-style per-parameter loop": ref2,
                "torch clip_grad_norm_ + AdamW(foreach)": torch_step,
            },
            args.repeat,
        ),
    )

    # The transform alone, in front of any optimizer.  Every contender first restores its
    # gradients from the originals (torch._foreach_copy_, timed with it: about one read and
    # one write of the data), as a new backward would: with fixed gradients AdaClip's bound
    # settles at max|g| and clips nothing, the common step.  Without the restore, each call
    # would transform the last call's output.
    sclip, sref = StableSPAMClip(), naive_stable_spam_transform()
    g1, g2, g3 = ([g.clone() for g in grads] for _ in range(3))

    def restored(gs: list[torch.Tensor], fn: Callable[[], object]) -> Callable[[], object]:
        return lambda: (torch._foreach_copy_(gs, grads), fn())

    p3 = params_like(g3)
    report(
        "Stable-SPAM's gradient transform alone (AdaClip + AdaGN), with a gradient restore",
        timeit(
            {
                "fastclip.adaptive.StableSPAMClip": restored(g1, lambda: sclip(g1)),
                "reference-style per-parameter loop": restored(g2, lambda: sref(g2)),
                "torch clip_grad_norm_(foreach) (global, not Stable-SPAM)": restored(
                    g3, lambda: torch.nn.utils.clip_grad_norm_(p3, 1e9, foreach=True)
                ),
            },
            args.repeat,
        ),
    )

    b = 32
    ps_shapes = [(b, 784, 512), (b, 512), (b, 512, 256), (b, 256), (b, 256, 10), (b, 10)]
    per_sample = [torch.randn(s) * 0.05 for s in ps_shapes]
    q, peer = QuantileClip(1.0), opacus_quantile(1.0)
    report(
        f"Quantile DP clipping (batch {b}, MLP 784-512-256-10)",
        timeit(
            {
                "fastclip.adaptive.QuantileClip.clip_per_sample": lambda: q.clip_per_sample(
                    per_sample
                ),
                "Opacus AdaClip arithmetic in torch": lambda: peer(per_sample),
            },
            args.repeat,
        ),
    )


if __name__ == "__main__":
    main()
