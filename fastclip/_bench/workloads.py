"""What is clipped.  A *workload* is a named family; a *case* is one concrete
instance of it (one size, one list of shapes) and one dtype.

Operation kinds, with the memory traffic their bandwidth floor assumes:

* ``clip``   norm-based clipping (global over a list, or of one array):
  read (norm) + read and write (scale) = 3 passes over the data;
* ``rows``   per-row clipping of a ``[B, D]`` batch (``clip_by_norm(x, c, axis=1)``):
  3 passes;
* ``value``  clamp to ``[-v, v]``: read + write = 2 passes;
* ``norm``   (global) norm only: 1 read;
* ``persample`` per-sample (DP-SGD) clipping summed over the batch: the
  per-sample gradients read twice (norms, then the weighted sum) = 2 passes;
* ``adamw``  global-norm clip + one AdamW step: g read for the norm, then p, g,
  m, v read and p, m, v written by a fused update = 8 passes over the
  gradients' bytes (the fused step's own bytes; unfused peers move more);
* ``train``  a whole training step (forward, backward, clip, AdamW) of a small
  GPT-style model (:mod:`fastclip._bench.train`): compute-bound, no floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PASSES = {"clip": 3, "rows": 3, "value": 2, "norm": 1, "adamw": 8, "persample": 2, "train": 0}

#: Batch and per-sample parameter shapes of the ``per-sample`` workload: a
#: 784-1024-256-10 MLP with biases (1,068,810 parameters per sample); the quick
#: suite clips a batch of ``PER_SAMPLE_QUICK_BATCH`` (137 MB of float32 instead
#: of 1.1 GB: the default run stays within a minute and 3 GB).
PER_SAMPLE_BATCH = 256
PER_SAMPLE_QUICK_BATCH = 32
PER_SAMPLE_SHAPES = [(784, 1024), (1024,), (1024, 256), (256,), (256, 10), (10,)]

#: The quick suite's smaller cases, so that the default run stays within a
#: minute and 3 GB on 2 cores with every peer installed (measured before:
#: 3:38 and 13.9 GB, of which optax's jax.jit of 2,000 arrays compiled for
#: 37 s and the adamw case kept 8 backends' GPT-2 small states alive).
#: ``gpt2-mini``: GPT-2's layout with width 512, 2 layers, vocabulary 8,192.
GPT2_MINI = (512, 2, 8192)
TINY_QUICK, TINY_FULL = 500, 2000

#: Batch size of the ``rows`` workload; ``--sizes`` sets B * D.
ROWS_BATCH = 256


def gpt2_shapes(
    n_embd: int, n_layer: int, vocab: int = 50257, n_positions: int = 1024
) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 model (Hugging Face layout, Conv1D weights [in, out]).

    >>> s = gpt2_shapes(768, 12)
    >>> len(s), sum(math.prod(x) for x in s)
    (148, 124439808)
    """
    d = n_embd
    shapes: list[tuple[int, ...]] = [(vocab, d), (n_positions, d)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [
            (d,),
            (d,),  # ln_1 weight, bias
            (d, 3 * d),
            (3 * d,),  # attn.c_attn weight, bias
            (d, d),
            (d,),  # attn.c_proj weight, bias
            (d,),
            (d,),  # ln_2 weight, bias
            (d, 4 * d),
            (4 * d,),  # mlp.c_fc weight, bias
            (4 * d, d),
            (d,),  # mlp.c_proj weight, bias
        ]
    shapes += [(d,), (d,)]  # ln_f weight, bias
    return shapes


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str
    help: str
    quick_sizes: tuple[int, ...] = ()  # empty: fixed shapes, --sizes does not apply
    full_sizes: tuple[int, ...] = ()
    in_quick: bool = True  # part of the default suite
    large: bool = False  # CPU only with --large (GPU backends always)

    @property
    def sized(self) -> bool:
        return bool(self.full_sizes)


@dataclass(frozen=True)
class Case:
    workload: str
    kind: str
    label: str  # e.g. "single 1e7", "gpt2-small"
    shapes: tuple[tuple[int, ...], ...]
    size: int  # total elements
    large: bool = False
    extra: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def passes(self) -> int:
        return PASSES[self.kind]


def _pow10(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(10**k for k in range(lo, hi + 1))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "single",
            "clip",
            "one array, clip by norm (size sweep 1e3..1e8)",
            quick_sizes=_pow10(3, 7),
            full_sizes=_pow10(3, 8),
        ),
        Workload(
            "gpt2-mini",
            "clip",
            "global-norm clip of a small GPT-2 layout (width 512, 2 layers, vocabulary "
            "8,192): 28 tensors, 11M values",
        ),
        Workload(
            "gpt2-small",
            "clip",
            "global-norm clip of GPT-2 small's 148 parameter tensors (124M values; --full)",
            in_quick=False,
        ),
        Workload(
            "gpt2-xl",
            "clip",
            "global-norm clip of GPT-2 XL's 580 parameter tensors (1.56B values); "
            "GPU backends, or the CPU with --large",
            in_quick=False,
            large=True,
        ),
        Workload(
            "tiny",
            "clip",
            f"global-norm clip of {TINY_QUICK:,} tensors of 1,000 values ({TINY_FULL:,} "
            "with --full)",
        ),
        Workload(
            "rows",
            "rows",
            f"per-row clip of a [{ROWS_BATCH}, D] batch (per-sample clipping, axis=1)",
            quick_sizes=(ROWS_BATCH * 16384,),
            full_sizes=(ROWS_BATCH * 1024, ROWS_BATCH * 16384, ROWS_BATCH * 262144),
        ),
        Workload(
            "value",
            "value",
            "one array, clip by value to [-1, 1]",
            quick_sizes=(10**7,),
            full_sizes=(10**5, 10**7, 10**8),
        ),
        Workload(
            "per-sample",
            "persample",
            f"per-sample clipping (DP-SGD, flat) of {PER_SAMPLE_QUICK_BATCH} samples "
            f"({PER_SAMPLE_BATCH} with --full) of a 1.07M-parameter MLP's gradients, "
            "summed over the batch",
        ),
        Workload(
            "adamw",
            "adamw",
            "global-norm clip + AdamW step of gpt2-mini's 28 tensors (11M values; GPT-2 "
            "small's 148 tensors, 124M values, with --full): fused fastclip vs "
            "clip_grad_norm_ + torch.optim.AdamW",
        ),
        Workload(
            "train",
            "train",
            "whole training step (forward, backward, clip, AdamW) of a 7.4M-parameter "
            "GPT-style model on the CPU: FusedAdamW(norm_in_backward=True) vs torch's "
            "clip_grad_norm_ + AdamW(fused=True), each against its step without clipping",
            in_quick=False,
        ),
        Workload(
            "norm",
            "norm",
            "one array, L2 norm only (no write)",
            quick_sizes=(10**7,),
            full_sizes=(10**5, 10**7, 10**8),
            in_quick=False,
        ),
    ]
}


def _fmt_size(n: int) -> str:
    if n >= 1000 and n == 10 ** round(math.log10(n)):
        return f"1e{round(math.log10(n))}"
    return f"{n:,}"


def cases_for(name: str, sizes: tuple[int, ...] | None, full: bool) -> list[Case]:
    """The cases of workload ``name``; ``sizes`` overrides its size list (sized ones)."""
    w = WORKLOADS[name]
    if w.sized:
        chosen = sizes if sizes is not None else (w.full_sizes if full else w.quick_sizes)
        out = []
        for n in chosen:
            if w.kind == "rows":
                d = max(1, n // ROWS_BATCH)
                shape: tuple[int, ...] = (ROWS_BATCH, d)
                label = f"rows {ROWS_BATCH}x{d}"
            else:
                shape = (n,)
                label = f"{name} {_fmt_size(n)}"
            out.append(Case(name, w.kind, label, (shape,), math.prod(shape), w.large))
        return out
    if name == "gpt2-small" or (name == "adamw" and full):
        shapes = gpt2_shapes(768, 12)
    elif name in ("gpt2-mini", "adamw"):
        shapes = gpt2_shapes(GPT2_MINI[0], GPT2_MINI[1], vocab=GPT2_MINI[2])
    elif name == "gpt2-xl":
        shapes = gpt2_shapes(1600, 48)
    elif name == "tiny":
        shapes = [(1000,)] * (TINY_FULL if full else TINY_QUICK)
    elif name == "per-sample":
        batch = PER_SAMPLE_BATCH if full else PER_SAMPLE_QUICK_BATCH
        shapes = [(batch, *s) for s in PER_SAMPLE_SHAPES]
    elif name == "train":
        return [Case(name, w.kind, "train gpt 7.4M", (), 0, w.large)]
    else:  # pragma: no cover - every fixed workload is listed above
        raise KeyError(name)
    label = f"{name} ({len(shapes)})" if name != "tiny" else f"tiny {len(shapes)}x1000"
    if name == "adamw":
        label = f"adamw {'gpt2-small' if full else 'gpt2-mini'} ({len(shapes)})"
    elif name == "per-sample":
        label = f"per-sample {shapes[0][0]}x1.07M"
    return [Case(name, w.kind, label, tuple(shapes), sum(math.prod(s) for s in shapes), w.large)]
