"""The ``train`` workload: one whole training step of a small GPT-style model on the CPU.

Forward, backward, global-norm clip (``max_norm`` below the gradients' norm,
so every clip multiplies) and an AdamW step, timed as one call, in four forms
on four copies of the same model (same initial weights, same batch):

* ``torch-fused``        ``torch.nn.utils.clip_grad_norm_`` + ``AdamW(fused=True)``;
* ``torch-fused-noclip`` ``AdamW(fused=True)`` alone: the step without clipping;
* ``fastclip-torch``     ``fastclip.torch.FusedAdamW(max_norm=..., norm_in_backward=True)``:
  the norm taken by hooks during backward, clipped inside the fused step;
* ``fastclip-noclip``    ``FusedAdamW()`` without ``max_norm``.

Speedups against ``*-noclip`` are (step without clipping) / (step with it):
1.00x means the clip is free.  The share of a step spent clipping is
``1 - noclip / clipped`` for each library (in the report's notes).  The check
compares each form's weights after one step with torch's fused AdamW step
clipped with the float64 norm's coefficient, from the same start ("max err":
relative to the largest move of a weight in that step).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

#: The model: vocabulary, width, layers, heads, sequence length, batch size.
#: 7.38M parameters (embeddings, 4 blocks, head); one step is ~0.1-0.3 s
#: on 2 cores, so the clip's own passes are ~1-4% of it.
MODEL = {"vocab": 8192, "d": 256, "layers": 4, "heads": 4, "seq": 64, "batch": 4}
MAX_NORM = 0.1  # below the initial gradients' norm (about 1-3): every step clips
FORMS = ("torch-fused", "torch-fused-noclip", "fastclip-torch", "fastclip-noclip")
ROLES = {
    "torch-fused": "peer",
    "torch-fused-noclip": "peer",
    "fastclip-torch": "fastclip",
    "fastclip-noclip": "fastclip",
}
HELP = {
    "torch-fused": "clip_grad_norm_ + torch AdamW(fused=True)",
    "torch-fused-noclip": "torch AdamW(fused=True), no clipping",
    "fastclip-torch": "FusedAdamW(max_norm, norm_in_backward=True)",
    "fastclip-noclip": "FusedAdamW(), no clipping",
}


def gpt_model(seed: int = 0) -> Any:
    """A small causal transformer language model (torch)."""
    import torch

    m = MODEL
    torch.manual_seed(seed)

    class GPT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = torch.nn.Embedding(m["vocab"], m["d"])
            self.pos = torch.nn.Parameter(torch.randn(m["seq"], m["d"]) * 0.02)
            layer = torch.nn.TransformerEncoderLayer(
                m["d"], m["heads"], 4 * m["d"], dropout=0.0, batch_first=True, norm_first=True
            )
            self.blocks = torch.nn.TransformerEncoder(
                layer, m["layers"], enable_nested_tensor=False
            )
            self.head = torch.nn.Linear(m["d"], m["vocab"])
            mask = torch.nn.Transformer.generate_square_subsequent_mask(m["seq"])
            self.register_buffer("mask", mask)

        def forward(self, idx: Any) -> Any:
            h = self.tok(idx) + self.pos[: idx.shape[1]]
            return self.head(self.blocks(h, mask=self.mask, is_causal=True))

    return GPT()


def batch(seed: int = 1) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MODEL["vocab"], (MODEL["batch"], MODEL["seq"]), generator=g)


def make_step(form: str, model: Any, idx: Any) -> Callable[[], Any]:
    """One training step of ``model`` in ``form``; returns the loss."""
    import torch

    import fastclip.torch as fct

    params = list(model.parameters())
    opt: Any
    if form.startswith("torch"):
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    elif form == "fastclip-torch":
        opt = fct.FusedAdamW(params, lr=1e-4, max_norm=MAX_NORM, norm_in_backward=True)
    else:
        opt = fct.FusedAdamW(params, lr=1e-4)
    clip = form == "torch-fused"
    vocab = MODEL["vocab"]

    def step() -> Any:
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), idx[:, 1:].reshape(-1)
        )
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _weights(model: Any) -> Any:
    import torch

    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference_step(base: Any, idx: Any, clip: bool) -> Any:
    """The weights after one step of torch's fused AdamW from ``base``, clipped (when
    ``clip``) with the coefficient of the float64 norm: what every form should give."""
    import torch

    m = copy.deepcopy(base)
    params = list(m.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    vocab = MODEL["vocab"]
    logits = m(idx)
    torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), idx[:, 1:].reshape(-1)
    ).backward()
    if clip:
        grads = [p.grad.double() for p in params if p.grad is not None]
        exact = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        torch.nn.utils.clip_grads_with_norm_(params, MAX_NORM, exact)
    opt.step()
    return _weights(m)


def one_step_error(form: str, base: Any, idx: Any, refs: dict[bool, Any]) -> float:
    """Max difference of the weights after one step of ``form`` from the float64-norm
    reference, beyond one float32 spacing of the weight, relative to the largest move
    of a weight in that step.

    The spacing is forgiven because fastclip's AdamW computes the update in float64
    and rounds the new weight once, torch in float32: the stored weights may differ by
    one unit in the last place.  With weights near 0.2 and lr 1e-4 that unit
    (1.5e-8) alone is 1.5e-4 of the step, larger than any real clipping error.
    """
    import torch

    clip = form in ("torch-fused", "fastclip-torch")
    m = copy.deepcopy(base)
    make_step(form, m, idx)()
    ref = refs[clip]
    moved = (ref - _weights(base)).abs().max()
    ulp = torch.nextafter(ref.abs(), torch.tensor(float("inf"))) - ref.abs()
    beyond = ((_weights(m) - ref).abs() - ulp).clamp_min(0)
    return float(beyond.max() / moved.clamp_min(1e-30))


def run_case(
    case: Any, dtype: str, cfg: Any, record: Callable[..., dict[str, Any]], tick: Any
) -> list[dict[str, Any]]:
    """Time the four forms, interleaved, as the runner times any case."""
    from . import timing

    if dtype != "float32":
        return [record(f, "n/a", reason="the train workload runs in float32") for f in FORMS]
    base = gpt_model(cfg.seed)
    idx = batch(cfg.seed + 1)
    nbytes = sum(p.numel() * 4 for p in base.parameters())
    rows: dict[str, dict[str, Any]] = {}
    ops: dict[str, timing.Timed] = {}
    refs = {clip: reference_step(base, idx, clip) for clip in (False, True)}
    for form in FORMS:
        tick(form)
        err = one_step_error(form, base, idx, refs)
        step = make_step(form, copy.deepcopy(base), idx)
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        row = record(form, "ok", nbytes=nbytes)
        # fastclip's norm is accurate to float32 rounding; torch's float32 norm of a
        # 2M-element embedding gradient is off by ~2e-4 here, which Adam's eps turns
        # into ~2e-3 of a step on the embedding's smallest gradients: not a failure
        tol = 1e-4 if ROLES[form] == "fastclip" else 1e-2
        row.update(first_call_s=first, max_rel_err=err, tolerance=tol)
        if not err <= tol:
            row.update(status="FAILED", reason=f"weights differ from the reference by {err:.3g}")
        else:
            ops[form] = timing.Timed("cpu", step, None, 1 << 40)  # one step per block
        rows[form] = row
    stats = timing.interleaved(ops, cfg.repeat, tick) if ops else {}
    for name, st in stats.items():
        rows[name].update(st)
        rows[name]["gbps"] = rows[name]["nbytes"] / st["median_s"] / 1e9
    return list(rows.values())


def clip_shares(results: list[dict[str, Any]]) -> dict[str, float]:
    """``1 - noclip / clipped`` per library, from a report's ``train`` rows."""
    med = {
        r["backend"]: r["median_s"]
        for r in results
        if r.get("workload") == "train" and r.get("median_s")
    }
    out = {}
    for lib, clipped, plain in (
        ("torch", "torch-fused", "torch-fused-noclip"),
        ("fastclip", "fastclip-torch", "fastclip-noclip"),
    ):
        c, n = med.get(clipped), med.get(plain)
        if c and n:
            out[lib] = 1.0 - n / c
    return out
