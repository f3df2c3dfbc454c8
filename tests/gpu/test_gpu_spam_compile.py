"""Compile the fused SPAM and Stable-SPAM CUDA kernels (``spam_kernels.cu``:
``fastclip_spam``, ``fastclip_stable_spam``, ``fastclip_clipped_sq``) for sm_80 and
sm_90 without a GPU (nvcc, else NVRTC), as ``test_gpu_compile.py`` does for the
other sources, and check that their hyper-parameter columns are the host's.

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


KERNELS = ["fastclip_spam", "fastclip_stable_spam", "fastclip_clipped_sq"]


def test_the_launched_kernels_are_the_sources_kernels():
    own = _modules.own_source("spam")
    names = _modules.name_expressions("spam")
    assert names == [f"{k}<{t}>" for k in KERNELS for t in _modules.ELEMENT_TYPES.values()]
    assert re.findall(r"__global__ void (\w+)\(", own) == KERNELS
    driver = pathlib.Path(_spam.__file__).read_text()
    assert all(f'"{k}"' in driver for k in KERNELS) and 'kernel("spam"' in driver
    # the reductions Stable-SPAM reuses are the core module's (compiled by test_gpu_compile.py)
    core = _modules.name_expressions("core")
    assert "fastclip_partial_pow_sum<float>" in core and "fastclip_tensor_norms<double>" in core
    assert '"fastclip_partial_pow_sum"' in driver and '"fastclip_tensor_norms"' in driver
    # compiled after kernels.cu and optim_kernels.cu, whose helpers it uses
    src = _modules.source("spam")
    assert src.index("fastclip_adamw") < src.index("fastclip_spam") and "sqrt_rn" in src


@pytest.mark.parametrize("prefix", ["P", "Q"])
def test_the_columns_are_the_hosts(prefix):
    """Every FC_P_* (SPAM) / FC_Q_* (Stable-SPAM) define of the CUDA source is the
    P_* / Q_* column of fastclip._spam_hparams, and each is read by its kernel."""
    own = _modules.own_source("spam")
    defines = dict(re.findall(rf"#define FC_{prefix}_(\w+) (\d+)", own))
    host = {k[2:]: v for k, v in vars(H).items() if k.startswith(f"{prefix}_")}
    assert {k: int(v) for k, v in defines.items()} == host
    for name in host:
        assert own.count(f"FC_{prefix}_{name}") >= 2, name  # defined and used


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
