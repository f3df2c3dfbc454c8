"""Compile every CUDA kernel for sm_80 and sm_90 without a GPU (nvcc, else NVRTC).

This file owns the CUDA sources' compilation; their values are checked on a device in
the other tests/gpu/ files and, emulated, in tests/gpu/emulated/.

The GPU drivers build their sources lazily with ``cupy.RawModule`` on the first
GPU call: ``kernels.cu`` (norms and clipping), ``wide_kernels.cu`` (float64-accumulating
norms), ``optim_kernels.cu`` (fused AdamW/SGD) and ``per_sample_kernels.cu`` (DP-SGD), the others compiled
appended to ``kernels.cu`` for its element access and reductions.  This check
makes sure each source, with every template instantiation its driver launches,
compiles on machines that have no GPU, CI included.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

from fastclip._gpu import _axes, _modules, _optim, _optim_plan, _per_sample, _tables, _wide

#: module -> (feature, kernel name prefix, number of launched instantiations, its drivers)
MODULES = {
    "kernels": ("core", "fastclip_", 6 * 4 + 3 * 2, (_tables, _axes, _optim_plan)),
    "wide_kernels": ("wide", "fastclip_", 1 * 4 + 1 * 2, (_wide,)),
    "optim_kernels": ("optim", "fastclip_", 2 * 4, (_optim,)),
    "per_sample_kernels": ("per_sample", "fastclip_ps_", 4 * 4 + 2, (_per_sample,)),
}


def _full_source(feature) -> str:
    return _modules.source(feature) + "\n" + _modules.explicit_instantiations(feature) + "\n"


@pytest.mark.parametrize("which", MODULES)
def test_every_launched_kernel_is_in_the_source(which):
    feature, prefix, count, drivers = MODULES[which]
    own = _modules.own_source(feature)
    names = _modules.name_expressions(feature)
    assert len(names) == len(set(names)) == count
    kernels = {expr.split("<")[0] for expr in names}
    for name in kernels:
        assert name.startswith(prefix)
        assert f"__global__ void {name}(" in own
    assert set(re.findall(r"__global__ void (\w+)\(", own)) == kernels  # none left out
    # the feature's drivers launch exactly these names, each with its own module
    driver = "".join(pathlib.Path(mod.__file__).read_text() for mod in drivers)
    for name in kernels:
        assert f'"{name}"' in driver
    assert f'kernel("{feature}"' in driver


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("which", MODULES)
def test_kernels_compile_with_nvcc(which, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the NVRTC check below covers this machine if it can")
    feature = MODULES[which][0]
    cu = tmp_path / f"{which}_check.cu"
    cu.write_text(_full_source(feature))
    ptx = tmp_path / f"{which}.ptx"
    result = subprocess.run(
        [nvcc, "-ptx", f"-arch={arch}", "-std=c++17", str(cu), "-o", str(ptx)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    text = ptx.read_text()
    # only this module's launched instantiations become entries (kernels.cu's
    # templates appended before the others are not instantiated there)
    assert text.count(".entry") == len(_modules.name_expressions(feature))
    if feature == "optim":  # float32 math correctly rounded, never approximated (CPU parity)
        assert "div.approx" not in text and "sqrt.approx" not in text


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("which", MODULES)
def test_kernels_compile_with_nvrtc(which, arch):
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
        prog = nvrtc.createProgram(_full_source(MODULES[which][0]), f"{which}.cu", [], [])
    except Exception as exc:  # the bindings import, but libnvrtc.so is not on this machine
        pytest.skip(f"NVRTC cannot be loaded here: {exc}")
    try:
        nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", "-std=c++17", *includes])
    except Exception as exc:  # the log says what failed
        pytest.fail(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(prog)}")
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("which", MODULES)
def test_each_driver_builds_its_own_source(which, monkeypatch):
    """The RawModule each driver asks CuPy for holds its source and its instantiations
    (a fake ``cupy`` records the call: no GPU needed)."""
    import contextlib
    import sys
    import types

    calls = []
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(Device=lambda i: contextlib.nullcontext())
    fake.RawModule = lambda **kw: calls.append(kw) or "module"
    monkeypatch.setitem(sys.modules, "cupy", fake)
    feature = MODULES[which][0]
    assert _modules.module.__wrapped__(feature, 0) == "module"
    (kw,) = calls
    assert kw["code"] == _modules.source(feature)
    assert kw["name_expressions"] == _modules.name_expressions(feature)
    assert "-std=c++17" in kw["options"]
