"""The textbook recipe on NumPy (``numpy``) and on CuPy (``cupy``):
``np.linalg.norm`` per array, the norm of the norms, then multiply in place
(``np.clip`` / vectorised row norms for the other kinds); the Opacus formula
array by array for ``per-sample``; the textbook AdamW loop for ``adamw``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data import ADAMW, CaseData
from ._common import Op


def _naive_ops(xp: Any, arrays: list[Any], d: CaseData, inplace: bool) -> Op:
    """The textbook recipe: per-array norm, norm of norms, multiply."""
    kind = d.case.kind
    x = arrays[0]
    dt = x.dtype.type if xp is np else x.dtype
    if kind == "persample":  # the Opacus formula, array by array
        c = d.max_norm

        def persample() -> list[Any]:
            flat = [a.reshape(a.shape[0], -1) for a in arrays]
            norms = xp.sqrt(sum(xp.linalg.norm(g, axis=1) ** 2 for g in flat))
            f = xp.minimum(1.0, c / (norms + 1e-6)).astype(x.dtype)
            return [xp.tensordot(f, a, axes=1) for a in arrays]

        return persample
    if kind in ("clip", "norm"):
        c = d.max_norm if kind == "clip" else 0.0

        def total() -> Any:
            if len(arrays) == 1:
                return xp.linalg.norm(x)
            return xp.linalg.norm(xp.asarray([xp.linalg.norm(a) for a in arrays]))

        if kind == "norm":
            return total

        def clip() -> list[Any]:
            coef = xp.minimum(1.0, c / (total() + 1e-6))
            coef = dt(coef) if xp is np else coef.astype(dt)
            if inplace:
                for a in arrays:
                    a *= coef
                return arrays
            return [a * coef for a in arrays]

        return clip
    if kind == "rows":
        c = d.max_norm

        def rows() -> list[Any]:
            f = xp.minimum(1.0, c / (xp.linalg.norm(x, axis=1, keepdims=True) + 1e-6))
            f = f.astype(x.dtype)
            if inplace:
                xp.multiply(x, f, out=x)
                return arrays
            return [x * f]

        return rows
    v = d.clip_value
    if inplace:
        return lambda: (xp.clip(x, -v, v, out=x), arrays)[1]
    return lambda: [xp.clip(x, -v, v)]


def _naive_adamw(xp: Any, grads: list[Any], params: list[Any], d: CaseData) -> Op:
    """The textbook clip + AdamW step, one array operation at a time."""
    lr, (b1, b2), eps, wd = (ADAMW[k] for k in ("lr", "betas", "eps", "weight_decay"))
    m = [xp.zeros_like(p) for p in params]
    v = [xp.zeros_like(p) for p in params]
    step = [0]
    c = d.max_norm

    def op() -> list[Any]:
        step[0] += 1
        total = xp.linalg.norm(xp.asarray([xp.linalg.norm(g) for g in grads]))
        coef = xp.minimum(1.0, c / (total + 1e-6))
        bc1 = 1 - b1 ** step[0]
        bc2 = (1 - b2 ** step[0]) ** 0.5
        for p, g, mk, vk in zip(params, grads, m, v):
            gc = g * coef.astype(g.dtype) if xp is not np else g * g.dtype.type(coef)
            p *= 1 - lr * wd
            mk *= b1
            mk += (1 - b1) * gc
            vk *= b2
            vk += (1 - b2) * gc * gc
            p -= (lr / bc1) * mk / (xp.sqrt(vk) / bc2 + eps)
        return params + m

    return op


def make_numpy(d: CaseData, inplace: bool) -> Op:
    if d.case.kind == "adamw":
        return _naive_adamw(np, d.numpy_arrays(), d.param_copies("numpy"), d)
    return _naive_ops(np, d.numpy_arrays(), d, inplace)


def make_cupy(d: CaseData, inplace: bool) -> Op:
    import cupy

    if d.case.kind == "adamw":
        return _naive_adamw(cupy, d.cupy_arrays(), d.param_copies("cupy"), d)
    return _naive_ops(cupy, d.cupy_arrays(), d, inplace)
