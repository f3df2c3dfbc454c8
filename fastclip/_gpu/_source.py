"""The CUDA source and the kernel names instantiated from it.

Kept free of CuPy imports so the compile check (tests, CI) and the host-side
planning tests run on machines without a GPU.
"""

from __future__ import annotations

from importlib import resources

#: C++ element types per storage kind, and the norm output type per kind.
ELEMENT_TYPES = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}
NORM_TYPES = ("float", "double")

_PER_ELEMENT = (
    "fastclip_partial_pow_sum",
    "fastclip_scale",
    "fastclip_clamp",
    "fastclip_rows_pow_sum",
    "fastclip_cols_pow_sum",
    "fastclip_axis_scale",
)
_PER_NORM = ("fastclip_finish", "fastclip_axis_coefs")


def source() -> str:
    """The text of ``kernels.cu``."""
    return resources.files("fastclip._gpu").joinpath("kernels.cu").read_text()


def name_expressions() -> list[str]:
    """Every template instantiation the driver launches (for ``RawModule``)."""
    names = [f"{k}<{t}>" for k in _PER_ELEMENT for t in ELEMENT_TYPES.values()]
    names += [f"{k}<{t}>" for k in _PER_NORM for t in NORM_TYPES]
    return names


def own_source() -> str:
    """The kernels this module's names refer to (here: all of ``kernels.cu``)."""
    return source()


def explicit_instantiations() -> str:
    """C++ explicit instantiations of every kernel, for compile checks with nvcc/NVRTC."""
    return instantiations(source(), name_expressions())


def instantiations(src: str, names: list[str]) -> str:
    """Explicit instantiations of ``names`` (``"kernel<type>"``) of the templates in ``src``.

    Shared by the three kernel sources (``kernels.cu``, ``optim_kernels.cu``,
    ``per_sample_kernels.cu``); the template parameters are named ``T`` (element
    type) or ``N`` (norm type).
    """
    import re

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
