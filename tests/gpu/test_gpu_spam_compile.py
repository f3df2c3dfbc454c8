"""Compile the fused SPAM CUDA kernel (``spam_kernels.cu``) for sm_80 and sm_90
without a GPU (nvcc, else NVRTC), as ``test_gpu_compile.py`` does for the other
sources, and check that its hyper-parameter columns are the host's.

The kernel's values are checked, emulated, in
``tests/gpu/emulated/test_gpu_spam_emulated.py`` and on a device in
``tests/gpu/test_gpu_spam.py``.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

from fastclip import _spam_hparams as H
from fastclip._gpu import _modules, _spam


def _full_source() -> str:
    return _modules.source("spam") + "\n" + _modules.explicit_instantiations("spam") + "\n"


def test_the_launched_kernel_is_the_sources_only_kernel():
    own = _modules.own_source("spam")
    names = _modules.name_expressions("spam")
    assert names == [f"fastclip_spam<{t}>" for t in _modules.ELEMENT_TYPES.values()]
    assert re.findall(r"__global__ void (\w+)\(", own) == ["fastclip_spam"]
    driver = pathlib.Path(_spam.__file__).read_text()
    assert '"fastclip_spam"' in driver and 'kernel("spam"' in driver
    # compiled after kernels.cu and optim_kernels.cu, whose helpers it uses
    src = _modules.source("spam")
    assert src.index("fastclip_adamw") < src.index("fastclip_spam") and "sqrt_rn" in src


def test_the_columns_are_the_hosts():
    """Every FC_P_* define of the CUDA source is the P_* column of fastclip._spam_hparams."""
    own = _modules.own_source("spam")
    defines = dict(re.findall(r"#define FC_P_(\w+) (\d+)", own))
    host = {k[2:]: v for k, v in vars(H).items() if k.startswith("P_")}
    assert {k: int(v) for k, v in defines.items()} == host


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_spam_kernel_compiles_with_nvcc(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the NVRTC check below covers this machine if it can")
    cu = tmp_path / "spam_check.cu"
    cu.write_text(_full_source())
    ptx = tmp_path / "spam.ptx"
    result = subprocess.run(
        [nvcc, "-ptx", f"-arch={arch}", "-std=c++17", str(cu), "-o", str(ptx)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    text = ptx.read_text()
    assert text.count(".entry") == len(_modules.name_expressions("spam"))
    # float32 math correctly rounded, never approximated (parity with the CPU kernel)
    assert "div.approx" not in text and "sqrt.approx" not in text


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_spam_kernel_compiles_with_nvrtc(arch):
    if shutil.which("nvcc") is not None:
        pytest.skip("nvcc checked this source already (see test_spam_kernel_compiles_with_nvcc)")
    nvrtc = pytest.importorskip(
        "cupy_backends.cuda.libs.nvrtc", reason="neither nvcc nor CuPy's NVRTC bindings here"
    )
    includes = [
        f"-I{d}/include"
        for d in (os.environ.get("CUDA_PATH"), "/usr/local/cuda")
        if d and os.path.isdir(f"{d}/include")
    ]
    try:
        prog = nvrtc.createProgram(_full_source(), "spam.cu", [], [])
    except Exception as exc:  # the bindings import, but libnvrtc.so is not on this machine
        pytest.skip(f"NVRTC cannot be loaded here: {exc}")
    try:
        nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", "-std=c++17", *includes])
    except Exception as exc:  # the log says what failed
        pytest.fail(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(prog)}")
    finally:
        nvrtc.destroyProgram(prog)
