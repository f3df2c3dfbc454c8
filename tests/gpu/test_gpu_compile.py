"""Compile every CUDA kernel for sm_80 and sm_90 without a GPU (nvcc, else NVRTC).

The GPU drivers build their sources lazily with ``cupy.RawModule`` on the first
GPU call: ``kernels.cu`` (norms and clipping), ``optim_kernels.cu`` (fused
AdamW/SGD) and ``per_sample_kernels.cu`` (DP-SGD), the last two compiled
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

from fastclip._gpu import _optim, _per_sample, _source

#: module -> (kernel name prefix, number of launched instantiations)
MODULES = {
    "kernels": (_source, "fastclip_", 6 * 4 + 2 * 2),
    "optim_kernels": (_optim, "fastclip_", 2 * 4),
    "per_sample_kernels": (_per_sample, "fastclip_ps_", 4 * 4 + 2),
}


def _full_source(mod) -> str:
    return mod.source() + "\n" + mod.explicit_instantiations() + "\n"


@pytest.mark.parametrize("which", MODULES)
def test_every_launched_kernel_is_in_the_source(which):
    mod, prefix, count = MODULES[which]
    own = mod.own_source()
    names = mod.name_expressions()
    assert len(names) == len(set(names)) == count
    kernels = {expr.split("<")[0] for expr in names}
    for name in kernels:
        assert name.startswith(prefix)
        assert f"__global__ void {name}(" in own
    assert set(re.findall(r"__global__ void (\w+)\(", own)) == kernels  # none left out
    if mod is not _source:  # each driver launches exactly these names
        driver = pathlib.Path(mod.__file__).read_text()
        for name in kernels:
            assert f'"{name}"' in driver


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("which", MODULES)
def test_kernels_compile_with_nvcc(which, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the NVRTC check below covers this machine if it can")
    mod = MODULES[which][0]
    cu = tmp_path / f"{which}_check.cu"
    cu.write_text(_full_source(mod))
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
    assert text.count(".entry") == len(mod.name_expressions())
    if mod is _optim:  # float32 math correctly rounded, never approximated (CPU parity)
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

    from fastclip._gpu import _driver

    calls = []
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(Device=lambda i: contextlib.nullcontext())
    fake.RawModule = lambda **kw: calls.append(kw) or "module"
    monkeypatch.setitem(sys.modules, "cupy", fake)
    mod = MODULES[which][0]
    build = _driver._module if mod is _source else mod._module
    assert build.__wrapped__(0) == "module"
    (kw,) = calls
    assert kw["code"] == mod.source() and kw["name_expressions"] == mod.name_expressions()
    assert "-std=c++17" in kw["options"]
