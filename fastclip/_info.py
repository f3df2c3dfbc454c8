"""``fastclip.info()``: what this installation will do with each array type."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

from . import _dispatch
from ._version import __version__

_LIBRARIES = {
    "numpy": ("numpy.ndarray", _dispatch.ROUTE_CPU),
    "torch": ("torch.Tensor (cpu)", _dispatch.ROUTE_CPU),
    "cupy": ("cupy.ndarray", _dispatch.ROUTE_GPU),
    "jax": ("jax.Array", _dispatch.ROUTE_GENERIC),
    "array-api-strict": ("array_api_strict.Array", _dispatch.ROUTE_GENERIC),
    "dask": ("dask.array.Array", _dispatch.ROUTE_DASK),
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    """GPUs visible to torch or CuPy, without importing either if it is not installed."""
    found: list[str] = []
    if _version("torch") is not None:
        try:
            import torch

            if torch.cuda.is_available():
                found += [
                    f"torch cuda:{i} {torch.cuda.get_device_name(i)}"
                    for i in range(torch.cuda.device_count())
                ]
        except Exception as exc:  # pragma: no cover - broken CUDA installs
            found.append(f"torch: CUDA query failed ({exc})")
    for dist in ("cupy", "cupy-cuda13x", "cupy-cuda12x"):
        if _version(dist) is not None:
            try:
                import cupy

                if cupy.is_available():
                    found += [f"cupy device {i}" for i in range(cupy.cuda.runtime.getDeviceCount())]
            except Exception as exc:  # pragma: no cover
                found.append(f"cupy: CUDA query failed ({exc})")
            break
    return found


def _gpu_status() -> str:
    try:
        _dispatch.check_gpu_available()
    except _dispatch.GPUUnavailableError as exc:
        return "unavailable here: " + str(exc).split(";")[0].split(":")[0]
    return "available"


def info() -> dict[str, Any]:
    """Versions, threading, routes per array type and GPUs seen, as a dict.

    ``fastclip info`` prints the same.  Routes: ``numba-cpu`` (Numba kernels,
    zero-copy), ``cupy-gpu`` (CuPy kernels; GPUUnavailableError without CuPy or a GPU),
    ``dask`` (lazy, chunk by chunk with the Numba kernels), ``array-api`` (the generic
    Array API implementation).

    Examples
    --------
    >>> import fastclip
    >>> report = fastclip.info()
    >>> report["routes"]["numpy.ndarray"]
    'numba-cpu'
    """
    import numba

    cpu = _dispatch.cpu_status()

    configured_layer = getattr(numba.config, "THREADING_LAYER", "default")
    routes = {}
    for dist, (label, route) in _LIBRARIES.items():
        version = _version(dist) or (_version("cupy-cuda13x") if dist == "cupy" else None)
        if route == _dispatch.ROUTE_GPU:  # its status says what is missing, CuPy included
            routes[label] = f"{route} ({_gpu_status()})"
        elif dist == "numpy" or version is not None:
            routes[label] = route
        else:
            routes[label] = f"{route} (not installed)"
    if _version("torch") is not None:
        routes["torch.Tensor (cuda)"] = f"{_dispatch.ROUTE_GPU} ({_gpu_status()})"
        routes["torch.Tensor (other devices)"] = _dispatch.ROUTE_GENERIC
    return {
        "fastclip": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {
            d: _version(d)
            for d in (
                "numpy",
                "numba",
                "llvmlite",
                "array-api-compat",
                "torch",
                "cupy-cuda13x",
                "cupy-cuda12x",
                "jax",
            )
        },
        "numba_threading_layer": cpu["threading_layer"]
        or f"not started yet (configured: {configured_layer})",
        "numba_threads": numba.get_num_threads(),
        "cpu_threads": cpu["threads"],
        "cpu_count": os.cpu_count(),
        "numba_cache": cpu["cache"],
        "backward_norm": _backward_norm_rule(),
        # scalar bounds take the routes below; array-valued ones (broadcast, as
        # TensorFlow's tensor bounds) are not a kernel's input: say where they go
        "array_bounds": (
            "clip_by_value / clip_by_norm with array bounds: the norms from the route "
            "below, then one elementwise op of the array's own library"
        ),
        "routes": routes,
        "gpus": _gpus(),
    }


def _hook_rule(threshold: int) -> str:
    if threshold <= 0:
        return "a post-accumulate-grad hook on every parameter"
    if threshold >= 1 << 62:
        return "no hooks: one packed pass when the norm is asked for"
    return f"hooks on parameters of >= {threshold:,} elements, one packed pass for the rest"


def _backward_norm_rule() -> str:
    """Where fastclip.torch.BackwardNorm / norm_in_backward=True take each norm."""
    from . import _config

    return (
        f"CPU: {_hook_rule(_config.BACKWARD_HOOK_MIN_NUMEL)}; "
        f"CUDA: {_hook_rule(_config.BACKWARD_HOOK_MIN_NUMEL_CUDA)}"
    )


def format_info(report: dict[str, Any]) -> str:
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k:<32} {v if v is not None else '-'}" for k, v in value.items()]
        elif isinstance(value, list):
            lines.append(f"{key}: {', '.join(value) if value else 'none'}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
