"""Compile every per-sample CUDA kernel for sm_80 and sm_90 without a GPU (nvcc, else NVRTC).

``fastclip/_gpu/per_sample_kernels.cu`` is compiled appended to ``kernels.cu``
by ``cupy.RawModule`` on the first GPU call of ``clip_per_sample``; this check
makes sure that source, with every template instantiation the driver launches,
compiles on machines that have no GPU, CI included.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

from fastclip._gpu import _per_sample as gps


def _full_source() -> str:
    return gps.source() + "\n" + gps.explicit_instantiations() + "\n"


def test_every_launched_kernel_is_in_the_source():
    own = gps.own_source()
    driver = pathlib.Path(gps.__file__).read_text()
    names = {expr.split("<")[0] for expr in gps.name_expressions()}
    for name in names:
        assert name.startswith("fastclip_ps_")
        assert f"__global__ void {name}(" in own
        assert f'"{name}"' in driver
    assert set(re.findall(r"__global__ void (\w+)\(", own)) == names  # none left out
    assert len(gps.name_expressions()) == 4 * 4 + 2


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_with_nvcc(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the NVRTC check below covers this machine if it can")
    cu = tmp_path / "per_sample_check.cu"
    cu.write_text(_full_source())
    ptx = tmp_path / "per_sample.ptx"
    result = subprocess.run(
        [nvcc, "-ptx", f"-arch={arch}", "-std=c++17", str(cu), "-o", str(ptx)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    # kernels.cu's templates are not instantiated here: only the per-sample entries
    assert ptx.read_text().count(".entry") == len(gps.name_expressions())


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
    try:
        prog = nvrtc.createProgram(_full_source(), "per_sample_kernels.cu", [], [])
    except Exception as exc:  # the bindings import, but libnvrtc.so is not on this machine
        pytest.skip(f"NVRTC cannot be loaded here: {exc}")
    try:
        nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", "-std=c++17", *includes])
    except Exception as exc:  # the log says what failed
        pytest.fail(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(prog)}")
    finally:
        nvrtc.destroyProgram(prog)
