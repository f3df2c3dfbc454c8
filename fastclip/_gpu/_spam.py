"""GPU driver of the fused SPAM and Stable-SPAM steps (``spam_kernels.cu``), with the
CPU route's names (``_cpu/_spam.py``): ``spam_prepare`` validates and packs the
lists (``_optim.Step``: per-dtype device tables, one device, shapes, dtypes,
overlaps of written memory; nothing is written), ``spam_run`` uploads the
per-tensor rows (``fastclip._spam_hparams.P_*`` / ``Q_*``, cached by content)
and launches one ``fastclip_spam`` / ``fastclip_stable_spam`` per dtype on the
caller's stream.

Stable-SPAM's per-tensor scalars come first from ``spam_reduce``, as on the CPU
route: ``"max"`` (max |g| per tensor: ``kernels.cu``'s
``fastclip_partial_pow_sum`` with ord_code 0) and ``"clipped_sq"`` (the sum of
squares after AdaClip: ``fastclip_clipped_sq``), each one read of the
gradients, per-chunk partials combined per tensor by ``fastclip_tensor_norms``
into one float64 device vector in the caller's order, then copied to the host:
one synchronisation per reduction (two a step, plus the caller's read of the
0-d AdaClip / AdaGN statistics), because the caller computes AdaClip's and
AdaGN's scalars in float64 on the host exactly as the CPU route does.  SPAM's
step makes no host synchronisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _config as cfg
from .._spam_hparams import P_COLS, Q_COLS
from . import _adapters, _modules
from ._modules import ELEMENT_TYPES
from ._optim import Step
from ._tables import Group, device_table, elementwise_grid, grid_size, ptr_or_null, u64

__all__ = ["spam_prepare", "spam_reduce", "spam_run"]

#: (kernel, row columns, pointer lists) of each kind of fused step.
_KINDS = {"spam": ("fastclip_spam", P_COLS, 4), "stable_spam": ("fastclip_stable_spam", Q_COLS, 5)}


def _check_kind(kind: str, what: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"{what}: kind must be 'spam' or 'stable_spam', got {kind!r}")


def spam_prepare(lib: Any, lists: list[Any], kind: str, what: str) -> Step:
    """Validate and pack one fused step's lists: SPAM (params, grads, exp_avg,
    exp_avg_sq) or Stable-SPAM (+ max_exp_avg_sq, None without amsgrad)."""
    _check_kind(kind, what)
    with _adapters.on_device(lib, lists[0][0]):
        return Step(lib, lists, [True, False, True, True, True][: _KINDS[kind][2]], what)


def _rows(prepared: Step, g: Group, values: np.ndarray) -> np.ndarray:
    assert g.index is not None  # a step's groups know their positions in the lists
    rows = values if len(g.index) == prepared.n else values[g.index]
    return np.ascontiguousarray(rows, np.float64)


def spam_reduce(
    lib: Any, prepared: Step, n: int, op: str, hats: Any = None, shrinks: Any = None
) -> np.ndarray:
    """Per-tensor float64 values of the gradients (list 1) in the caller's order, on
    the host: ``"max"``: max |g| (NaN if any element is NaN); ``"clipped_sq"``: the
    sum of squares of ``g * shrinks[t]`` where ``|g| > hats[t]``, else ``g``.
    Zero-size tensors give 0.  Synchronises once (the copy to the host)."""
    if op not in ("max", "clipped_sq"):
        raise ValueError(f"spam_reduce: op must be 'max' or 'clipped_sq', got {op!r}")
    assert n == prepared.n
    like = prepared.like
    with _adapters.on_device(lib, like):
        out = lib.empty((n,), "float64", like)
        for g in prepared.groups:
            if not g.n_chunks:
                continue
            assert g.index is not None
            grads = u64(int(g.ptrs) + 8 * g.n)  # list 1 of the table
            partials = lib.empty((g.n_chunks,), "float64", like)
            grid = grid_size(g.n_chunks, cfg.GPU_MAX_BLOCKS)
            nc, chunk = np.int64(g.n_chunks), np.int64(cfg.GPU_CHUNK)
            head = (grads, g.sizes, g.chunk_tensor, g.chunk_start, nc, chunk)
            if op == "max":  # the core's power sum with ord_code 0: max |g|, NaN wins
                feature, name = "core", "fastclip_partial_pow_sum"
                extra: tuple[Any, ...] = (np.int32(0), np.float64(np.inf))
            else:
                clip = np.stack([_rows(prepared, g, hats), _rows(prepared, g, shrinks)], 1)
                dev = device_table(lib, like, np.ascontiguousarray(clip).reshape(-1))
                feature, name, extra = "spam", "fastclip_clipped_sq", (ptr_or_null(lib, dev),)
            k = _modules.kernel(feature, prepared.device, name, ELEMENT_TYPES[g.kind])
            k((grid,), (cfg.GPU_BLOCK,), (*head, *extra, u64(lib.ptr(partials))))
            # per-tensor combination of the partials (ord_code 0: max, 1: plain sum)
            pos = device_table(lib, like, np.asarray(g.index, np.int64))
            k = _modules.kernel("core", prepared.device, "fastclip_tensor_norms", "double")
            k(
                (elementwise_grid(g.n, cfg.GPU_BLOCK, cfg.GPU_MAX_BLOCKS),),
                (cfg.GPU_BLOCK,),
                (
                    u64(lib.ptr(partials)),
                    g.chunk_tensor,
                    np.int64(g.n_chunks),
                    np.int64(g.n),
                    ptr_or_null(lib, pos),
                    np.int32(0 if op == "max" else 1),
                    np.float64(1.0),
                    u64(lib.ptr(out)),
                ),
            )
        host = np.array(lib.host_array(out), np.float64)  # the documented synchronisation
    for g in prepared.groups:
        if not g.n_chunks:  # only zero-size tensors: nothing was launched for them
            host[g.index] = 0.0
    return host


def spam_run(
    lib: Any, prepared: Step, params: list[Any], hparams: np.ndarray, kind: str, amsgrad: bool
) -> None:
    """One fused launch per dtype (``hparams``: one P_* (SPAM) or Q_* (Stable-SPAM)
    row per tensor, in the caller's order; ``amsgrad``: Stable-SPAM's
    max_exp_avg_sq list is read and written)."""
    _check_kind(kind, "spam_run")
    name, cols, _ = _KINDS[kind]
    assert hparams.shape == (prepared.n, cols)
    with _adapters.on_device(lib, params[0]):
        for g in prepared.groups:
            if not g.n_chunks:
                continue
            rows = _rows(prepared, g, hparams)
            dev = device_table(lib, prepared.like, rows.reshape(-1))
            k = _modules.kernel("spam", prepared.device, name, ELEMENT_TYPES[g.kind])
            grid = grid_size(g.n_chunks, cfg.GPU_MAX_BLOCKS)
            args: tuple[Any, ...] = (
                g.ptrs,
                np.int64(g.n),
                g.sizes,
                g.chunk_tensor,
                g.chunk_start,
                np.int64(g.n_chunks),
                np.int64(cfg.GPU_CHUNK),
                ptr_or_null(lib, dev),
            )
            if kind == "stable_spam":
                args += (np.int32(1 if amsgrad else 0),)
            k((grid,), (cfg.GPU_BLOCK,), args)
        for view, copy in prepared.copies:
            lib.write_back(view, copy)
        lib.touched(params)
