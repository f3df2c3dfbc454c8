"""``fastclip warmup``: compile and cache the CPU kernels ahead of the first call.

Numba compiles each kernel for a dtype at its first call and caches the
machine code on disk (``NUMBA_CACHE_DIR`` when set, else next to the package,
else numba's user-wide cache folder).  Containers and clusters can fill that
cache once, at build time, so that no job pays the compile: every operation
below runs on a small array (the serial kernels) and on one just above
``PARALLEL_MIN_ELEMENTS`` (the parallel twins), for each dtype asked.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _api, _config, _dispatch
from .optim import adamw_step_, sgd_step_

#: Operation groups and what each calls (``x``: one array, ``xs``: a list).
OPS: dict[str, str] = {
    "norm": "norm, global_norm (ord 1, 2, inf, 3; the bulk header read of long lists)",
    "clip": "clip_by_norm_, normalize_, clip_by_global_norm_ (ord 1, 2, inf, 3)",
    "axis": "clip_by_norm_ along an axis (per-row and per-column)",
    "value": "clip_by_value_ of one array and of a list",
    "optim": "adamw_step_ and sgd_step_ with a global-norm clip",
    "per-sample": "clip_per_sample (flat and per layer)",
    "distributed": "fastclip.distributed's float64-accumulated local norms (ord 1, 2, inf, 3)",
    "spam": "fastclip.torch.SPAMAdamW / StableSPAMAdamW fused steps (needs torch)",
}
DTYPES = ("float32", "float64", "float16", "bfloat16")
ORDS = (1.0, 2.0, math.inf, 3.0)


def _arrays(dtype: str, n: int) -> list[Any]:
    """Two arrays of ``n`` values of ``dtype`` (bfloat16 as torch tensors)."""
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]
    if dtype == "bfloat16":
        import torch

        return [torch.from_numpy(a).to(torch.bfloat16) for a in base]
    return [a.astype(dtype) for a in base]


def _run_group(op: str, xs: list[Any]) -> None:
    x = xs[0]
    if op == "norm":
        for p in ORDS:
            _api.norm(x, p)
            _api.global_norm(xs, p)
        if isinstance(x, np.ndarray):
            # the bulk header read of long NumPy lists, compiled only after
            # OPTIONAL_KERNEL_AFTER_CALLS list calls (or when cached): cache it now
            many = [x[:4] for _ in range(_config.FAST_HEADERS_MIN_ARRAYS)]
            for _ in range(_config.OPTIONAL_KERNEL_AFTER_CALLS + 1):
                _api.global_norm(many)
    elif op == "clip":
        for p in ORDS:
            _api.clip_by_norm_(x, 1e30, p)
            _api.clip_by_global_norm_(xs, 1e30, p)
        _api.normalize_(xs[1])
    elif op == "axis":
        m = x.reshape(-1, 50) if x.shape[0] % 50 == 0 else x.reshape(1, -1)
        _api.clip_by_norm_(m, 1e30, axis=1)
        _api.clip_by_norm_(m, 1e30, axis=0)
    elif op == "value":
        _api.clip_by_value_(x, -1e30, 1e30)
        _api.clip_by_value_(xs, -1e30, 1e30)
    elif op == "optim":
        if str(x.dtype).rsplit(".", 1)[-1] not in ("float32", "float64"):
            return  # the fused steps keep float32/float64 state
        ms = [np.zeros_like(a) for a in xs]
        vs = [np.zeros_like(a) for a in xs]
        ps = [a.copy() for a in xs]
        adamw_step_(ps, xs, ms, vs, step=1, lr=0.0, max_norm=1e30)
        sgd_step_(ps, xs, [np.zeros_like(a) for a in xs], lr=0.0, momentum=0.9, max_norm=1e30)
    elif op == "per-sample":
        if str(x.dtype).rsplit(".", 1)[-1] not in ("float32", "float64"):
            return
        batch = x.reshape(10, -1) if x.shape[0] % 10 == 0 else x.reshape(1, -1)
        _api.clip_per_sample(batch, 1.0)
        _api.clip_per_sample([batch, batch], 1.0, per_layer=True)
    elif op == "distributed":
        for code, p in ((1, 1.0), (2, 2.0), (0, math.inf), (3, 3.0)):
            _dispatch.backend_for(xs).norm64(xs, code, p, None, wide=True)
    elif op == "spam":
        _spam_steps(xs)
    else:  # pragma: no cover - the CLI checks the names
        raise ValueError(f"unknown operation group {op!r}")


def _spam_steps(xs: list[Any]) -> None:
    """Two fused steps of each SPAM optimizer (Stable-SPAM with and without amsgrad) on
    tensors shaped like ``xs``: the second step of SPAM clips against its moments."""
    import torch

    from .torch import SPAMAdamW, StableSPAMAdamW

    dtype = getattr(torch, str(xs[0].dtype).rsplit(".", 1)[-1])
    params = [torch.nn.Parameter(torch.zeros(x.shape, dtype=dtype)) for x in xs]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizers = [
        SPAMAdamW(params, lr=0.0, grad_accu_steps=1, fused=True),
        StableSPAMAdamW(params, lr=0.0, fused=True),
        StableSPAMAdamW(params, lr=0.0, amsgrad=True, fused=True),
    ]
    for opt in optimizers:
        for _ in range(2):
            opt.step()


def warmup(
    dtypes: tuple[str, ...] = ("float32", "float64"),
    ops: tuple[str, ...] = tuple(OPS),
    report: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Compile (and cache on disk) the kernels of ``ops`` for ``dtypes``.

    Returns the seconds each ``"op dtype"`` took (the first run of a process
    on an empty cache compiles; on a warm cache it only loads).
    """
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from: {', '.join(DTYPES)}")
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}; choose from: {', '.join(OPS)}")
    # just above the parallel threshold, and a multiple of 50 (the axis case's rows)
    big = (_config.PARALLEL_MIN_ELEMENTS // 50 + 1) * 50
    times: dict[str, float] = {}
    for d in dtypes:
        small, large = _arrays(d, 1000), _arrays(d, big)
        for op in ops:
            if op == "spam" and importlib.util.find_spec("torch") is None:
                if report is not None:  # said, not silently dropped
                    report(f"{op:<11} {d:<9} skipped: torch is not installed")
                continue
            t0 = time.perf_counter()
            with np.errstate(all="ignore"):
                _run_group(op, small)
                _run_group(op, large)
            times[f"{op} {d}"] = time.perf_counter() - t0
            if report is not None:
                report(f"{op:<11} {d:<9} {times[f'{op} {d}']:7.2f} s")
    return times
