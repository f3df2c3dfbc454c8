"""A description of the machine a run was made on (goes into ``--json``)."""

from __future__ import annotations

import os
import platform
import re
import sys
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def short_name(model: str | None = None, gpus: list[str] | None = None) -> str:
    """A file-name-friendly machine name, e.g. ``epyc-7b13-2c``."""
    model = model or cpu_model()
    m = re.sub(r"\((r|tm)\)|cpu|processor|@.*$|\d+-core|with.*$", "", model, flags=re.I)
    words = [
        w
        for w in re.split(r"[^a-z0-9]+", m.lower())
        if w and w not in {"amd", "intel", "core", "genuine"}
    ]
    name = "-".join(words[:3]) or "cpu"
    return f"{name}-{os.cpu_count()}c"


def describe(backends_used: list[str]) -> dict[str, Any]:
    from .._info import info

    report = info()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numba_threading_layer": report["numba_threading_layer"],
        "numba_threads": report["numba_threads"],
        "gpus": report["gpus"],
        "versions": {"fastclip": report["fastclip"], **report["versions"], **_extra_versions()},
        "env": {
            k: os.environ[k]
            for k in (
                "NUMBA_NUM_THREADS",
                "NUMBA_THREADING_LAYER",
                "OMP_NUM_THREADS",
                "OPENBLAS_CORETYPE",
            )
            if k in os.environ
        },
        "backends": backends_used,
    }


def _extra_versions() -> dict[str, str | None]:
    from .._info import _version

    return {d: _version(d) for d in ("optax", "jaxlib", "matplotlib")}
