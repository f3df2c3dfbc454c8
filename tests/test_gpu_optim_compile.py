"""Compile every fused-optimizer CUDA kernel for sm_80 and sm_90 without a GPU (nvcc, else NVRTC).

``_gpu/_optim.py`` builds ``optim_kernels.cu`` lazily with ``cupy.RawModule``
on the first GPU step; this check makes sure the source (every template
instantiation the driver launches) compiles on machines that have no GPU, CI
included, as ``tests/test_gpu_compile.py`` does for the core kernels.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

from fastclip._gpu import _optim


def _full_source() -> str:
    return _optim.source() + "\n" + _optim.explicit_instantiations() + "\n"


def test_every_launched_kernel_is_in_the_source():
    src = _optim.source()
    names = _optim.name_expressions()
    assert len(names) == len(set(names)) == 2 * 4
    for expr in names:
        name = expr.split("<")[0]
        assert name.startswith("fastclip_")
        assert f"__global__ void {name}(" in src
    # every kernel name the driver launches is instantiated
    driver = pathlib.Path(_optim.__file__).read_text()
    for launched in set(re.findall(r'"(fastclip_(?:adamw|sgd))"', driver)):
        assert any(n.startswith(launched + "<") for n in names)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_with_nvcc(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the NVRTC check below covers this machine if it can")
    cu = tmp_path / "optim_kernels_check.cu"
    cu.write_text(_full_source())
    ptx = tmp_path / "optim_kernels.ptx"
    result = subprocess.run(
        [nvcc, "-ptx", f"-arch={arch}", "-std=c++17", str(cu), "-o", str(ptx)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    text = ptx.read_text()
    assert text.count(".entry") == len(_optim.name_expressions())
    # float32 math is correctly rounded and never approximated (CPU parity)
    assert "div.approx" not in text and "sqrt.approx" not in text


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernels_compile_with_nvrtc(arch):
    if shutil.which("nvcc") is not None:
        pytest.skip("nvcc checked this source already (see test_kernels_compile_with_nvcc)")
    nvrtc = pytest.importorskip(
        "cupy_backends.cuda.libs.nvrtc", reason="neither nvcc nor CuPy's NVRTC bindings here"
    )
    includes = [
        f"-I{d}/include"
        for d in (os.environ.get("CUDA_PATH"), "/usr/local/cuda")
        if d and os.path.isdir(f"{d}/include")
    ]
    prog = nvrtc.createProgram(_full_source(), "optim_kernels.cu", [], [])
    try:
        nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", "-std=c++17", *includes])
    except Exception as exc:  # the log says what failed
        pytest.fail(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(prog)}")
    finally:
        nvrtc.destroyProgram(prog)
