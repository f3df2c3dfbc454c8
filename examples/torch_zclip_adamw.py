"""A torch training loop with ZClip spike clipping and fastclip's fused AdamW.

Run:  python examples/torch_zclip_adamw.py [--tiny] [--steps N]

``ClippedOptimizer(FusedAdamW(...), ZClip())`` clips every step with ZClip's
z-score rule, then runs the fused AdamW kernel (one launch for all tensors).
A few injected gradient spikes show ZClip at work; the loop also uses
``torch.amp.GradScaler`` the usual way (``scaler.step(optimizer)``).
"""

from __future__ import annotations

import argparse

import torch

from fastclip.adaptive import ZClip
from fastclip.torch import ClippedOptimizer, FusedAdamW


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a few steps on a small model (tests)")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    steps = 40 if args.tiny else args.steps
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = (x[:, :4].sin() * 2).sum(dim=1, keepdim=True)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
        torch.nn.Linear(64, 1),
    )  # fmt: skip
    zclip = ZClip(alpha=0.97, z_thresh=2.5, warmup_steps=10, nonfinite="skip")
    opt = ClippedOptimizer(FusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.01), zclip)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    spikes = {steps // 2, (3 * steps) // 4}
    losses = []
    for step in range(steps):
        idx = torch.randint(0, 512, (64,))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        scaler.scale(loss * (50.0 if step in spikes else 1.0)).backward()  # injected spike
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
        norm = zclip.last_total_norm
        if step in spikes or step % max(1, steps // 5) == 0:
            thr = zclip.last_threshold
            note = f"  clipped to {thr:.3f}" if thr is not None else ""
            print(f"step {step:4d}  loss {losses[-1]:.4f}  grad norm {norm:.3f}{note}")
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}; ZClip mean {zclip.mean:.3f}")
    return {"first": losses[0], "last": losses[-1]}


if __name__ == "__main__":
    main()
