"""DP-SGD clipped sums on a small transformer: ghost norms against the alternatives.

    python benchmarks/bench_ghost.py [--batches 32 128 512] [--reps 3] [--threads 2]
        [--limit-gb 8] [--part steps|forms|all] [--json OUT.json]

``--part steps``: one DP-SGD gradient step (forward, per-sample norms, clipped
sum into ``.grad``; no noise, no optimizer) of a 2-layer pre-norm transformer
(d=128, 4 heads, MLP 512, causal attention from Linear q, k, v; seq 64,
vocab 1000, a per-token LM head; each sample's loss is the mean over its
tokens), by

* ``fastclip ghost``: :class:`fastclip.torch.GhostClipping`, two passes;
* ``opacus ghost``: Opacus' ``GradSampleModuleFastGradientClipping`` +
  ``DPLossFastGradientClipping`` (``use_ghost_clipping=True``);
* ``vmap + clip_per_sample``: the per-sample gradients materialised by
  ``torch.func.vmap(grad)``, then :func:`fastclip.clip_per_sample`.

Each (method, B) runs in a fresh subprocess: one warm-up step, then the best
of ``--reps`` timed steps (the least disturbed by other jobs); the peak memory is the process's peak resident size
over the timed steps (``VmHWM``, reset after the warm-up through
``/proc/self/clear_refs``) minus its resident size before them: model, data,
imports and numba's compilation excluded; torch's CPU allocator returns large
blocks to the OS, so the peak is the step's.  A case whose materialised per-sample gradients alone would pass
``--limit-gb`` is skipped and said so.  Ratios are against ``fastclip ghost``
within the same run; the machine may be shared, so read ratios, not seconds.

``--part forms``: per-layer norm cost of the Gram and materialised forms at
the transformer's Linear shapes (``per_sample_grad_norms`` with
``linear_form`` forced), with the form ``"auto"`` picks, and the row norms
(the last step of both forms) by ``fastclip.norm(axis=1)`` against
``torch.linalg.vector_norm(dim=1)``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# One thread count for every pool, set before torch and numba start theirs: torch's
# set_num_threads is per thread (autograd's backward runs Opacus' hooks and these
# probes with the default pool), and on a loaded machine an idle OpenMP worker costs
# a scheduler quantum (about 28 ms measured here) per parallel op.
_THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "2"
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = _THREADS

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

VOCAB, D, HEADS, SEQ, LAYERS = 1000, 128, 4, 64, 2
METHODS = ("fastclip ghost", "opacus ghost", "vmap + clip_per_sample")


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(self.ln1(x)).chunk(3, -1)
        )
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5  # vmap has no SDPA rule
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(SEQ, D)
        self.blocks = nn.Sequential(*[Block(D, HEADS) for _ in range(LAYERS)])
        self.ln, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)  # Opacus views it: contiguous
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos(pos))))


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    b, t, v = logits.shape
    tokens = F.cross_entropy(logits.reshape(b * t, v), targets.reshape(-1), reduction="none")
    return tokens.reshape(b, t).mean(1)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _step_fn(method: str, model: nn.Module, ids: torch.Tensor, tgt: torch.Tensor, c: float):
    if method == "fastclip ghost":
        from fastclip.torch import GhostClipping

        ghost = GhostClipping(model, c, loss_reduction="sum")

        def step() -> None:
            model.zero_grad(set_to_none=True)
            ghost.backward(per_sample_loss(model(ids), tgt))

        return step
    if method == "opacus ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        # "mean": Opacus' per-sample loss is then the mean over each sample's tokens, as
        # per_sample_loss here; its .grad is the clipped sum for either reduction
        gsm = GradSampleModuleFastGradientClipping(
            model, max_grad_norm=c, loss_reduction="mean", use_ghost_clipping=True
        )
        opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(gsm.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=c,
            expected_batch_size=len(ids),
            loss_reduction="mean",
        )
        crit = DPLossFastGradientClipping(
            gsm, opt, nn.CrossEntropyLoss(reduction="mean"), loss_reduction="mean"
        )

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            logits = gsm(ids)
            crit(logits.reshape(-1, VOCAB), tgt.reshape(-1), shape=logits.shape).backward()

        return step
    import fastclip

    params = {k: p.detach() for k, p in model.named_parameters()}

    def one(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(torch.func.functional_call(model, p, (x[None],)), y[None])[0]

    per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))

    def step() -> None:
        grads = per_sample(params, ids, tgt)
        summed = fastclip.clip_per_sample(list(grads.values()), c, reduce="sum").grads
        for p, g in zip(model.parameters(), summed, strict=True):
            p.grad = g

    return step


def run_case(method: str, batch: int, reps: int) -> dict:
    """One (method, B) in this process: warm-up, then ``reps`` timed steps."""
    torch.manual_seed(0)
    model = TinyLM()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    tgt = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    step = _step_fn(method, model, ids, tgt, c=1.0)
    step()  # warm-up: numba compiles here, and LLVM's memory must not count as the step's
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: reset the peak (VmHWM)
        f.write("5")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")
    norm = float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
    return {
        "method": method,
        "B": batch,
        "s": min(times),
        "peak_mib": (peak - base) / 1024,
        "grad_norm": norm,
    }


def run_steps(args: argparse.Namespace) -> list[dict]:
    n_params = sum(p.numel() for p in TinyLM().parameters())
    rows = []
    for batch in args.batches:
        for method in METHODS:
            need_gb = batch * n_params * 4 / 1e9  # the [B, *param] gradients alone
            if method.startswith("vmap") and need_gb > args.limit_gb:
                print(
                    f"skip {method} B={batch}: per-sample gradients {need_gb:.1f} GB > {args.limit_gb} GB"
                )
                continue
            cmd = [sys.executable, __file__, "--case", method, str(batch), "--reps", str(args.reps)]
            cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{method} B={batch} failed:\n{out.stderr[-2000:]}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"  {method:<24} B={batch:<4} {r['s']:8.3f} s  peak {r['peak_mib']:8.0f} MiB",
                flush=True,
            )
    print(f"\n{n_params / 1e6:.2f}M parameters; ratios against fastclip ghost (same run):")
    print(
        f"{'B':>4}  {'method':<24} {'time':>9} {'x time':>7} {'peak MiB':>9} {'x peak':>7} {'|grad|':>9}"
    )
    for batch in args.batches:
        ref = next((r for r in rows if r["B"] == batch and r["method"] == METHODS[0]), None)
        for r in (r for r in rows if r["B"] == batch):
            xt = r["s"] / ref["s"] if ref else float("nan")
            xm = r["peak_mib"] / ref["peak_mib"] if ref else float("nan")
            print(
                f"{batch:>4}  {r['method']:<24} {r['s']:8.3f}s {xt:7.2f} {r['peak_mib']:9.0f} {xm:7.2f} {r['grad_norm']:9.4f}"
            )
    return rows


def _time(fn, reps: int = 7) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def run_forms(batch: int = 128) -> list[dict]:
    import fastclip
    from fastclip.torch import per_sample_grad_norms
    from fastclip.torch._ghost_layers import pick_form

    rows = []
    print(f"\nper-layer norms, B={batch}, T={SEQ} (ms; auto = the form 'auto' picks):")
    for d_in, d_out in [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D), (D, VOCAB)]:
        layer = nn.Linear(d_in, d_out)
        a, g = torch.randn(batch, SEQ, d_in), torch.randn(batch, SEQ, d_out)
        t = {
            f: _time(lambda f=f: per_sample_grad_norms(layer, a, g, linear_form=f))
            for f in ("gram", "materialize")
        }
        auto = pick_form(SEQ, d_in, d_out, "auto")
        best = min(t, key=t.get)
        rows.append({"d_in": d_in, "d_out": d_out, **t, "auto": auto, "fastest": best})
        print(
            f"  {d_in:>4} -> {d_out:<5} gram {1e3 * t['gram']:8.2f}  materialize {1e3 * t['materialize']:8.2f}  auto={auto}  fastest={best}"
        )
    print(
        "\nrow norms [rows, n] float32 (ms): fastclip.norm(axis=1) vs torch.linalg.vector_norm(dim=1)"
    )
    for n_rows, n in [(batch, D * 3 * D), (batch, D * VOCAB), (batch * 8, D), (batch, SEQ * SEQ)]:
        x = torch.randn(n_rows, n)
        tf = _time(lambda x=x: fastclip.norm(x, axis=1))
        tt = _time(lambda x=x: torch.linalg.vector_norm(x, dim=1))
        rows.append({"rows": n_rows, "n": n, "fastclip": tf, "torch": tt})
        print(
            f"  [{n_rows}, {n}]  fastclip {1e3 * tf:7.2f}  torch {1e3 * tt:7.2f}  ({tt / tf:.1f}x)"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-gb", type=float, default=8.0)
    ap.add_argument("--part", choices=["steps", "forms", "all"], default="all")
    ap.add_argument("--json")
    ap.add_argument("--case", nargs=2, metavar=("METHOD", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.reps)))
        return
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs (shared: read ratios)"
    )
    out: dict = {}
    if args.part in ("steps", "all"):
        out["steps"] = run_steps(args)
    if args.part in ("forms", "all"):
        out["forms"] = run_forms()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
