"""The CUDA sources, the kernel names instantiated from them, and one cached
``cupy.RawModule`` per (feature, device).

Five features, each a ``.cu`` file: ``"core"`` (``kernels.cu``: norms and
clipping), ``"wide"`` (``wide_kernels.cu``: float64-accumulating norms for
``fastclip.distributed``), ``"optim"`` (``optim_kernels.cu``: fused AdamW/SGD),
``"per_sample"`` (``per_sample_kernels.cu``: DP-SGD) and ``"spam"``
(``spam_kernels.cu``: fused SPAM and Stable-SPAM).  The others are compiled
appended to ``kernels.cu``, whose element access and power-sum reduction they
reuse (``"spam"`` after ``optim_kernels.cu`` too, for its arithmetic).

Kept free of CuPy imports at module level, so the compile check (tests, CI)
and the host-side tests run on machines without a GPU; CuPy is imported only
when a module is built.
"""

from __future__ import annotations

import functools
import os
import re
from importlib import resources
from typing import Any

__all__ = [
    "ELEMENT_TYPES",
    "FEATURES",
    "NORM_TYPES",
    "explicit_instantiations",
    "instantiations",
    "kernel",
    "module",
    "name_expressions",
    "own_source",
    "raw_module",
    "source",
]

#: C++ element types per storage kind, and the norm output type per kind.
ELEMENT_TYPES = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}
NORM_TYPES = ("float", "double")

#: feature -> (its .cu file, kernels instantiated per element type, per norm type).
FEATURES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "core": (
        "kernels.cu",
        (
            "fastclip_partial_pow_sum",
            "fastclip_scale",
            "fastclip_clamp",
            "fastclip_rows_pow_sum",
            "fastclip_cols_pow_sum",
            "fastclip_axis_scale",
        ),
        (
            "fastclip_finish",
            "fastclip_axis_coefs",
            "fastclip_tensor_norms",
        ),
    ),
    "wide": (
        "wide_kernels.cu",
        ("fastclip_partial_pow_sum_wide",),
        ("fastclip_finish_wide",),
    ),
    "optim": ("optim_kernels.cu", ("fastclip_adamw", "fastclip_sgd"), ()),
    "spam": (
        "spam_kernels.cu",
        ("fastclip_spam", "fastclip_stable_spam", "fastclip_clipped_sq"),
        (),
    ),
    "per_sample": (
        "per_sample_kernels.cu",
        (
            "fastclip_ps_pow_partials",
            "fastclip_ps_weighted_sum",
            "fastclip_ps_combine",
            "fastclip_ps_scale_rows",
        ),
        ("fastclip_ps_factors",),
    ),
}


# ------------------------------------------------------------------ source


def own_source(feature: str) -> str:
    """The text of the feature's own ``.cu`` file alone."""
    return resources.files("fastclip._gpu").joinpath(FEATURES[feature][0]).read_text()


def source(feature: str) -> str:
    """What the feature's RawModule compiles: ``kernels.cu``, then (for the other
    features) the feature's own file (``"spam"``: ``optim_kernels.cu`` first)."""
    if feature == "core":
        return own_source("core")
    if feature == "spam":  # uses optim_kernels.cu's correctly rounded arithmetic
        return own_source("core") + "\n" + own_source("optim") + "\n" + own_source("spam")
    return own_source("core") + "\n" + own_source(feature)


def name_expressions(feature: str) -> list[str]:
    """Every template instantiation the feature's driver launches (for ``RawModule``)."""
    _, per_element, per_norm = FEATURES[feature]
    names = [f"{k}<{t}>" for k in per_element for t in ELEMENT_TYPES.values()]
    names += [f"{k}<{t}>" for k in per_norm for t in NORM_TYPES]
    return names


def explicit_instantiations(feature: str) -> str:
    """C++ explicit instantiations of every kernel, for compile checks with nvcc/NVRTC."""
    return instantiations(own_source(feature), name_expressions(feature))


def instantiations(src: str, names: list[str]) -> str:
    """Explicit instantiations of ``names`` (``"kernel<type>"``) of the templates in ``src``.

    Shared by the three kernel sources (``kernels.cu``, ``optim_kernels.cu``,
    ``per_sample_kernels.cu``); the template parameters are named ``T`` (element
    type) or ``N`` (norm type).
    """
    lines = []
    for expr in names:
        name, targ = expr[:-1].split("<")
        match = re.search(rf"__global__ void {name}\((.*?)\)\s*{{", src, re.S)
        if match is None:  # pragma: no cover - a renamed kernel
            raise LookupError(name)
        params = " ".join(match.group(1).split())
        params = re.sub(r"\b(N|T)\b", targ, params)
        lines.append(f"template __global__ void {name}<{targ}>({params});")
    return "\n".join(lines)


# ----------------------------------------------------------------- modules


def _include_options() -> tuple[str, ...]:
    """-I flags for cuda_fp16.h / cuda_bf16.h.

    Searched where CuPy itself finds CUDA (``cupy._environment.get_cuda_path``),
    then CUDA_PATH / CUDA_HOME / /usr/local/cuda, then the NVIDIA pip wheels
    (``nvidia/cu13/include`` or ``nvidia/cuda_runtime/include``).
    """
    roots: list[str] = []
    try:
        from cupy import _environment

        roots.append(_environment.get_cuda_path() or "")
    except Exception:  # pragma: no cover - older CuPy layouts
        pass
    roots += [os.environ.get("CUDA_PATH", ""), os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    try:
        import nvidia  # type: ignore[import-not-found]

        for base in nvidia.__path__:
            roots += [os.path.join(base, d) for d in sorted(os.listdir(base))]
    except ImportError:
        pass
    dirs: list[str] = []
    for root in roots:
        inc = os.path.join(root, "include") if root else ""
        if inc and os.path.isfile(os.path.join(inc, "cuda_fp16.h")) and inc not in dirs:
            dirs.append(inc)
    return tuple(f"-I{d}" for d in dirs)


def raw_module(device_id: int, code: str, names: list[str]) -> Any:
    """``cupy.RawModule`` of ``code`` on one device with the instantiations ``names``
    (C++17, the CUDA include folders that hold cuda_fp16.h/cuda_bf16.h)."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(
            code=code, options=("-std=c++17", *_include_options()), name_expressions=names
        )


@functools.cache
def module(feature: str, device_id: int) -> Any:
    """The RawModule of one feature's kernels for one device, built on first use."""
    return raw_module(device_id, source(feature), name_expressions(feature))


def kernel(feature: str, device_id: int, name: str, targ: str) -> Any:
    """The compiled ``name<targ>`` of one feature on one device (``targ``: a C++ type)."""
    return module(feature, device_id).get_function(f"{name}<{targ}>")
