"""GPU driver of the fused SPAM step (``spam_kernels.cu``), with the CPU route's
names (``_cpu/_spam.py``): ``spam_prepare`` validates and packs the lists
(``_optim.Step``: per-dtype device tables, one device, shapes, dtypes, overlaps
of written memory; nothing is written), ``spam_run`` uploads the per-tensor
rows (``fastclip._spam_hparams.P_*``, cached by content) and launches one
``fastclip_spam`` per dtype on the caller's stream.  No host synchronisation.

Stable-SPAM has no CUDA kernel here: ``fastclip.torch.StableSPAMAdamW`` takes its
``_foreach`` route on CUDA tensors (its ``fused`` argument says so), and
``spam_prepare`` / ``spam_reduce`` refuse it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _config as cfg
from . import _adapters, _modules
from ._modules import ELEMENT_TYPES
from ._optim import Step
from ._tables import device_table, grid_size, ptr_or_null

__all__ = ["spam_prepare", "spam_reduce", "spam_run"]

_NO_STABLE = (
    "{what}: Stable-SPAM has no fused CUDA kernel; CUDA tensors take the _foreach route "
    "(fused=None or fused=False)"
)


def spam_prepare(lib: Any, lists: list[Any], kind: str, what: str) -> Step:
    """Validate and pack one fused SPAM step's lists (params, grads, exp_avg, exp_avg_sq)."""
    if kind != "spam":
        raise TypeError(_NO_STABLE.format(what=what))
    with _adapters.on_device(lib, lists[0][0]):
        return Step(lib, lists, [True, False, True, True], what)


def spam_reduce(
    lib: Any, prepared: Any, n: int, op: str, hats: Any = None, shrinks: Any = None
) -> np.ndarray:
    raise TypeError(_NO_STABLE.format(what="spam_reduce"))


def spam_run(
    lib: Any, prepared: Step, params: list[Any], hparams: np.ndarray, kind: str, amsgrad: bool
) -> None:
    """One ``fastclip_spam`` launch per dtype (``hparams``: one P_* row per tensor)."""
    if kind != "spam":
        raise TypeError(_NO_STABLE.format(what="spam_run"))
    with _adapters.on_device(lib, params[0]):
        for g in prepared.groups:
            if not g.n_chunks:
                continue
            assert g.index is not None
            rows = hparams if len(g.index) == prepared.n else hparams[g.index]
            rows = np.ascontiguousarray(rows, np.float64)
            dev = device_table(lib, prepared.like, rows.reshape(-1))
            k = _modules.kernel("spam", prepared.device, "fastclip_spam", ELEMENT_TYPES[g.kind])
            grid = grid_size(g.n_chunks, cfg.GPU_MAX_BLOCKS)
            args = (
                g.ptrs,
                np.int64(g.n),
                g.sizes,
                g.chunk_tensor,
                g.chunk_start,
                np.int64(g.n_chunks),
                np.int64(cfg.GPU_CHUNK),
                ptr_or_null(lib, dev),
            )
            k((grid,), (cfg.GPU_BLOCK,), args)
        for view, copy in prepared.copies:
            lib.write_back(view, copy)
        lib.touched(params)
