"""Gradient-norm traces of one training run with and without adaptive clipping.

Run:  python docs/examples/adaptive_traces.py [--tiny] [--steps N] [--out traces.png]
(the PNG goes to the system's temporary folder unless ``--out`` says where).

The same small regression MLP (NumPy, hand-written backward) is trained with
noisy labels that produce occasional gradient spikes, four times: no
clipping, a fixed global-norm clip, AutoClip (10th percentile) and ZClip.
The traces (norm before clipping, the threshold each clipper applied, and a
mark on every step it clipped) are plotted with matplotlib when it is
installed; the table of clipped steps is printed either way.  ZClip only has a
threshold on the steps whose norm was a spike (its z-score above
``z_thresh``): those are drawn as points, not a line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from numpy_mlp_sgd import init, loss_and_grads

from fastclip.adaptive import AutoClip, GlobalNormClipper, ZClip


def run(clipper, steps: int) -> tuple[list[float], list[float], float]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype(np.float32)
    y = np.sin(x @ rng.normal(size=(8, 2))).astype(np.float32)
    params = init(np.random.default_rng(1), [8, 32, 32, 2])
    norms, thresholds = [], []
    batch_rng = np.random.default_rng(2)
    for _ in range(steps):
        idx = batch_rng.integers(0, 512, 32)
        yb = y[idx].copy()
        if batch_rng.random() < 0.05:  # a corrupted batch: a gradient spike
            yb += batch_rng.normal(0, 30, yb.shape).astype(np.float32)
        _loss, grads = loss_and_grads(params, x[idx], yb)
        if clipper is None:
            norms.append(float(np.sqrt(sum(float(np.sum(g * g)) for g in grads))))
            thresholds.append(float("nan"))
        else:
            norms.append(float(clipper(grads)))
            t = clipper.last_threshold
            thresholds.append(float("nan") if t is None else t)
        for p, g in zip(params, grads):
            p -= 0.05 * g
    full_loss, _ = loss_and_grads(params, x, y)
    return norms, thresholds, full_loss


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="few steps, print only (tests)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument(
        "--out",
        default=os.path.join(tempfile.gettempdir(), "adaptive_traces.png"),
        help="where to write the PNG (default: the temporary folder)",
    )
    args = ap.parse_args(argv)
    steps = 60 if args.tiny else args.steps
    runs = {
        "none": None,
        "global norm 1.0": GlobalNormClipper(1.0),
        "AutoClip p=10": AutoClip(percentile=10),
        "ZClip": ZClip(warmup_steps=10),
    }
    results = {name: run(c, steps) for name, c in runs.items()}
    print(f"{'clipper':18s} {'max norm':>9s} {'median':>8s} {'clipped':>8s} {'final loss':>10s}")
    for name, (norms, thr, loss) in results.items():
        clipped = sum(1 for n, t in zip(norms, thr) if t == t and n > t)
        print(f"{name:18s} {max(norms):9.2f} {np.median(norms):8.3f} {clipped:8d} {loss:10.4f}")
    try:
        if args.tiny:
            raise ImportError  # no files from the test run
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {name: r[2] for name, r in results.items()}
    fig, axes = plt.subplots(len(results), 1, figsize=(10.5, 2.2 * len(results)), sharex=True)
    for ax, (name, (norms, thr, _)) in zip(axes, results.items()):
        ax.semilogy(norms, lw=0.8, label="gradient norm")
        ax.semilogy(thr, lw=0.8, marker=".", ms=3, label="clip threshold")
        hits = [i for i, (n, t) in enumerate(zip(norms, thr)) if t == t and n > t]
        ax.semilogy(hits, [norms[i] for i in hits], "x", color="C3", ms=4, label="clipped")
        ax.set_title(f"{name}: clipped {len(hits)} of {len(norms)} steps", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the data
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return {name: r[2] for name, r in results.items()}


if __name__ == "__main__":
    main()
