"""CPU driver of the fused SPAM / Stable-SPAM steps of ``fastclip.torch``.

Two phases, so that nothing is written before everything is checked:
``spam_prepare`` validates and packs the parallel lists (the fused optimizers'
``_optim.groups``: per-dtype groups, shapes, dtypes, overlaps of written
memory), then ``spam_run`` launches one kernel of ``_spam_kernels`` per dtype.
Stable-SPAM's per-tensor scalars come first from ``spam_reduce``: ``"max"``
(max |g| per tensor, the core's per-array kernel ``tab_pow_sums``) and
``"clipped_sq"`` (the sum of squares after AdaClip, ``tab_clipped_sq``), each
one read of the gradients; they write nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _config as cfg
from . import _optim
from ._build import jit_pair
from ._launch import run_with
from ._per_array_kernels import tab_pow_sums

__all__ = ["spam_prepare", "spam_reduce", "spam_run"]

#: The kinds of fused step: SPAM (4 lists: params, grads, exp_avg, exp_avg_sq)
#: and Stable-SPAM (5 lists: + max_exp_avg_sq, None without amsgrad).
KINDS = ("spam", "stable_spam")


def spam_prepare(lib: Any, lists: list[Any], kind: str, what: str) -> list[Any]:
    """Validate and pack one fused step's lists (per-dtype groups); writes nothing."""
    if kind == "spam":
        return _optim.groups(lib, lists, [True, False, True, True], what)
    return _optim.groups(lib, lists, [True, False, True, True, True], what)


def _kernel(name: str) -> Any:
    """The serial/parallel pair of a ``_spam_kernels`` kernel.  The module is
    imported on the first fused SPAM step, not with the CPU route: the first
    global-norm call imports and builds nothing of it."""
    from . import _spam_kernels

    return jit_pair(getattr(_spam_kernels, name))


def _rows(g: Any, n: int, values: np.ndarray) -> np.ndarray:
    return values if len(g.index) == n else np.ascontiguousarray(values[g.index])


def spam_reduce(
    lib: Any, prepared: list[Any], n: int, op: str, hats: Any = None, shrinks: Any = None
) -> np.ndarray:
    """Per-tensor float64 values of the gradients (list 1) in the caller's order:
    ``"max"``: max |g| (NaN if any element is NaN); ``"clipped_sq"``: the sum of
    squares of ``g * shrinks[t]`` where ``|g| > hats[t]``, else ``g``."""
    out = np.empty(n, np.float64)
    for g in prepared:
        t = g.packs[1].tables[0]
        sums = np.empty(t.sizes.size, np.float64)
        if op == "max":
            args = (t.addrs, t.sizes, t.like, 0, np.inf, 1.0, cfg.CHUNK, sums)
            run_with(jit_pair(tab_pow_sums), t.n, *args)
        else:
            h, s = _rows(g, n, hats), _rows(g, n, shrinks)
            run_with(
                _kernel("tab_clipped_sq"), t.n, t.addrs, t.sizes, t.like, h, s, cfg.CHUNK, sums
            )
        out[g.index] = sums
    return out


def spam_run(
    lib: Any, prepared: list[Any], params: list[Any], hparams: np.ndarray, kind: str, amsgrad: bool
) -> None:
    """Run a prepared step: one fused launch per dtype (``hparams``: one
    ``fastclip._spam_hparams`` row per tensor, in the caller's order)."""
    n = len(params)
    for g in prepared:
        rows = _rows(g, n, hparams)
        addrs = [g.addrs(k) for k in range(len(g.packs))]
        if kind == "spam":
            run_with(_kernel("tab_spam"), g.n, *addrs, g.sizes, g.like, rows, cfg.CHUNK)
        else:
            run_with(
                _kernel("tab_stable_spam"), g.n, *addrs, g.sizes, g.like, rows, amsgrad, cfg.CHUNK
            )
        g.copy_out()
    lib.touched(params)
