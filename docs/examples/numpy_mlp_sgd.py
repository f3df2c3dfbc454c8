"""A NumPy-only MLP trained with a hand-written SGD step and fastclip's global-norm clipping.

Run:  python docs/examples/numpy_mlp_sgd.py [--tiny] [--steps N]

No deep-learning framework: forward and backward passes are written with NumPy,
``fastclip.clip_by_global_norm_`` clips the gradients in place (one multi-array
kernel launch), and ``fastclip.optim.sgd_step_`` is shown as the fused
alternative (clip coefficient applied inside the momentum-SGD update).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

import fastclip
from fastclip.optim import sgd_step_


def init(rng: np.random.Generator, sizes: list[int]) -> list[np.ndarray]:
    params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        params.append((rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32))
        params.append(np.zeros(fan_out, np.float32))
    return params


def loss_and_grads(params: list[np.ndarray], x: np.ndarray, y: np.ndarray):
    """Mean squared error of a tanh MLP, and its gradients (hand-written backward)."""
    acts = [x]
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        z = h @ params[2 * i] + params[2 * i + 1]
        h = np.tanh(z) if i < n_layers - 1 else z
        acts.append(h)
    diff = h - y
    loss = float(np.mean(diff**2))
    delta = 2 * diff / diff.size
    grads = [np.empty_like(p) for p in params]
    for i in reversed(range(n_layers)):
        grads[2 * i] = acts[i].T @ delta
        grads[2 * i + 1] = delta.sum(axis=0)
        if i:
            delta = (delta @ params[2 * i].T) * (1 - acts[i] ** 2)
    return loss, grads


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a few steps on small data (tests)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-norm", type=float, default=1.0)
    args = ap.parse_args(argv)
    steps = 20 if args.tiny else args.steps
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = np.sin(x @ rng.normal(size=(8, 2))).astype(np.float32)

    # 1) plain loop: clip in place, then a hand-written SGD step
    params = init(np.random.default_rng(1), [8, 32, 32, 2])
    first = None
    for step in range(steps):
        loss, grads = loss_and_grads(params, x, y)
        first = loss if first is None else first
        norm = fastclip.clip_by_global_norm_(grads, args.max_norm)
        for p, g in zip(params, grads):
            p -= 0.1 * g
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  loss {loss:.4f}  grad norm {float(norm):.3f}")
    plain = loss

    # 2) the fused version: momentum SGD with the clip inside the update
    params = init(np.random.default_rng(1), [8, 32, 32, 2])
    buffers = [np.empty_like(p) for p in params]
    for step in range(steps):
        loss, grads = loss_and_grads(params, x, y)
        sgd_step_(params, grads, buffers, lr=0.05, momentum=0.9, first_step=step == 0,
                  max_norm=args.max_norm)  # fmt: skip
    fused = loss
    print(f"loss: start {first:.4f}, clipped SGD {plain:.4f}, fused clip+momentum SGD {fused:.4f}")
    return {"first": first, "plain": plain, "fused": fused}


if __name__ == "__main__":
    main()
