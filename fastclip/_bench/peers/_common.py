"""What the peer modules and the registry share: the ``Op`` type, the probes
(is a library installed, is a GPU usable) and the ``adamw`` check's reader."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

Op = Callable[[], Any]


# ---------------------------------------------------------------- probes


def installed(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def probe_torch() -> str | None:
    return None if installed("torch") else "torch is not installed"


def probe_torch_cuda() -> str | None:
    if not installed("torch"):
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def probe_cupy() -> str | None:
    if not installed("cupy"):
        return "cupy is not installed"
    try:
        import cupy

        if not cupy.is_available():
            return "no CUDA device usable by CuPy (cupy.is_available() is False)"
    except Exception as exc:  # broken CUDA installs
        return f"cupy unusable: {exc}"
    return None


def gpu_storage() -> str | None:
    if probe_torch_cuda() is None:
        return "torch-cuda"
    if probe_cupy() is None:
        return "cupy"
    return None


def probe_fastclip_gpu() -> str | None:
    if gpu_storage() is None:
        return f"no usable CUDA GPU ({probe_torch_cuda()}; {probe_cupy()})"
    return None


def probe_opacus() -> str | None:
    missing = [m for m in ("torch", "opacus") if not installed(m)]
    return f"{' and '.join(missing)} not installed" if missing else None


def probe_optax() -> str | None:
    missing = [m for m in ("jax", "optax") if not installed(m)]
    return f"{' and '.join(missing)} not installed" if missing else None


# ---------------------------------------------------------------- adamw


def params_and_moments(params: list[Any], opt: Any) -> list[Any]:
    """What the ``adamw`` check reads: the parameters, then their first moments."""
    return list(params) + [opt.state[p]["exp_avg"] for p in params]
