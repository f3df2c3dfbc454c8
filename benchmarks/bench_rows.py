"""Per-row clipping: the fused ``rows_clip`` kernel against the two launches it
replaced and against torch.

    unset OPENBLAS_CORETYPE; python benchmarks/bench_rows.py [--dtype float64]

``fastclip.clip_by_norm_(x, c, axis=1)`` of a float32 (``--dtype float64``: float64,
the ``rows_clip_wide`` kernel) ``[256, D]`` torch tensor
(half the rows clipped), interleaved with the same call forced onto the
norms-then-scale launches (``AxisPlan.fused_clip`` returning None) and with
torch's vectorised form (``torch.linalg.vector_norm(x, dim=1)`` + ``mul_``, the
``rows`` peer of ``fastclip bench``); medians, one line per size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import fastclip
from fastclip._cpu import _axes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    fused_clip = _axes.AxisPlan.fused_clip
    for d in args.widths:
        t = torch.from_numpy(rng.standard_normal((args.batch, d)).astype(args.dtype))
        c = float(torch.linalg.vector_norm(t, dim=1).median())

        def fused() -> None:
            fastclip.clip_by_norm_(t, c, axis=1)

        def two_launches() -> None:
            _axes.AxisPlan.fused_clip = lambda *a, **k: None  # type: ignore[method-assign]
            try:
                fastclip.clip_by_norm_(t, c, axis=1)
            finally:
                _axes.AxisPlan.fused_clip = fused_clip  # type: ignore[method-assign]

        def torch_rows() -> None:
            f = (c / (torch.linalg.vector_norm(t, dim=1, keepdim=True) + 1e-6)).clamp_(max=1.0)
            t.mul_(f)

        fns = (fused, two_launches, torch_rows)
        times: dict[str, list[float]] = {f.__name__: [] for f in fns}
        for f in fns:
            f()
        for _ in range(args.rounds):
            for f in fns:
                t0 = time.perf_counter()
                f()
                times[f.__name__].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(
            f"{args.dtype} {args.batch}x{d}: fused {med['fused']:.3f} ms; two launches "
            f"{med['two_launches'] / med['fused']:.2f}x its time; torch "
            f"{med['torch_rows'] / med['fused']:.2f}x"
        )


if __name__ == "__main__":
    main()
