"""Stable-SPAM's CUDA kernels (``fastclip_stable_spam`` and ``fastclip_clipped_sq`` of
``spam_kernels.cu``, compiled after ``kernels.cu`` and ``optim_kernels.cu`` as the GPU
route does) built for the host and run under the GPU driver (``fastclip/_gpu/_spam.py``)
through ``StableSPAMAdamW``, without a GPU.

The shim of ``test_gpu_wide_host_compiled.py`` and the intrinsics of
``test_gpu_spam_host_compiled.py`` are reused (every CUDA thread a host thread).  The
core's reductions the driver also launches (``fastclip_partial_pow_sum``,
``fastclip_tensor_norms``) stay the NumPy transcriptions of
``tests/_stable_spam_emulation.py``; the two Stable-SPAM kernels are the compiled
source.  30 steps (spikes, resets, the schedule, amsgrad) are checked against the
float64 transcription of stablespam.py (``tests/integration/_spam_oracles.py``), the
fused CPU route, and the GPU route with the emulated kernels.

Skips, with the reason, where no C++ compiler with C++20 ``<barrier>`` and
``_Float16`` is on the PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import pathlib
import re
import subprocess
from typing import Any

import numpy as np
import pytest

from fastclip import _config as cfg
from fastclip import _dispatch, _gpu
from fastclip._gpu import _adapters, _modules, _tables

torch = pytest.importorskip("torch")

from fastclip.torch import StableSPAMAdamW  # noqa: E402


def _load(path: pathlib.Path) -> Any:
    # tests/gpu/emulated is not on sys.path under --import-mode=importlib: load by file
    spec = importlib.util.spec_from_file_location(f"_fastclip_{path.stem}_shc", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_HERE = pathlib.Path(__file__)
_WIDE = _load(_HERE.with_name("test_gpu_wide_host_compiled.py"))
_HC = _load(_HERE.with_name("test_gpu_spam_host_compiled.py"))
_EMU = _load(_HERE.with_name("test_gpu_spam_emulated.py"))
CXX, SHIM, CTYPE = _WIDE.CXX, _WIDE.SHIM, _WIDE.CTYPE
ELEMENTS = ("float", "double", "__half")
NAMES = ("fastclip_stable_spam", "fastclip_clipped_sq")


def _build(d: pathlib.Path, src: str) -> dict[tuple[str, str], Any]:
    if CXX is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH to build spam_kernels.cu")
    cmd = [CXX, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]
    (d / "probe.cpp").write_text("#include <barrier>\n_Float16 h = 1;\nstd::barrier<> b(1);\n")
    probe = subprocess.run(
        [*cmd, str(d / "probe.cpp"), "-o", str(d / "probe.so")], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"{CXX} lacks C++20 <barrier> or _Float16: {probe.stderr[:300]}")
    lines, kinds = [], {}
    for name in NAMES:
        match = re.search(rf"__global__ void {name}\((.*?)\)\s*{{", src, re.S)
        assert match is not None
        types = [" ".join(p.split()).rsplit(" ", 1)[0] for p in match.group(1).split(",")]
        kinds[name] = "".join(_HC._kind(t) for t in types)
        for targ in ELEMENTS:
            typed = [re.sub(r"\bT\b", targ, t) for t in types]
            args = ", ".join(f"{t} a{i}" for i, t in enumerate(typed))
            names = ", ".join(f"a{i}" for i in range(len(typed)))
            lines.append(
                f'extern "C" void {name}_{targ.strip("_")}(int grid, int block, {args}) {{\n'
                f"    launch(grid, block, [=] {{ {name}<{targ}>({names}); }});\n}}"
            )
    src = src.replace("#include <cuda_fp16.h>", "").replace("#include <cuda_bf16.h>", "")
    (d / "stable.cpp").write_text(SHIM + _HC.INTRINSICS + src + "\n".join(lines) + "\n")
    result = subprocess.run(
        [*cmd, str(d / "stable.cpp"), "-o", str(d / "stable.so")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lib = ctypes.CDLL(str(d / "stable.so"))
    calls = {}
    for name in NAMES:
        ks = kinds[name]
        for targ in ELEMENTS:
            fn = getattr(lib, f"{name}_{targ.strip('_')}")
            fn.argtypes = [ctypes.c_int, ctypes.c_int] + [CTYPE[k] for k in ks]
            fn.restype = None

            def call(grid: Any, block: Any, args: Any, fn: Any = fn, ks: str = ks) -> None:
                assert len(args) == len(ks), "the driver's arguments are the kernel's parameters"
                conv = [int(a) if k in "pqi" else float(a) for a, k in zip(args, ks, strict=True)]
                fn(int(grid[0]), int(block[0]), *conv)

            calls[(name, targ)] = call
    return calls


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    return _build(tmp_path_factory.mktemp("cuda_stable_host"), _modules.source("spam"))


def _steps(library: Any, monkeypatch: pytest.MonkeyPatch, dtype: str, extra: dict) -> None:
    """30 StableSPAMAdamW steps on three routes: GPU driver with the compiled kernels,
    GPU driver with the emulated kernels, fused CPU route; and the float64 oracle."""
    compiled_ids: set[int] = set()
    emulated_ids: set[int] = set()
    real = _dispatch.backend_for_step
    backend = _dispatch.Backend("gpu", _gpu, _EMU.TorchHostLib)
    current = {"compiled": False}
    launches: list[str] = []

    def pick(lists: Any, what: str) -> Any:
        key = id(lists[0][0])
        if key in compiled_ids or key in emulated_ids:
            current["compiled"] = key in compiled_ids
            return backend
        return real(lists, what)

    def kernel(feature: str, device: int, name: str, targ: str) -> Any:
        if current["compiled"] and feature == "spam":
            launches.append(name)
            return library[(name, targ)]
        return _EMU._emulate(feature, device, name, targ)

    monkeypatch.setattr(_dispatch, "backend_for_step", pick)
    monkeypatch.setattr(_modules, "kernel", kernel)
    monkeypatch.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    monkeypatch.setattr(cfg, "GPU_BLOCK", 64)
    monkeypatch.setattr(cfg, "GPU_MAX_BLOCKS", 3)  # grid-stride loops over the chunks
    monkeypatch.setattr(cfg, "GPU_CHUNK", 7)  # many chunks per array, ragged ends
    _tables.TABLES.clear()
    kw = dict(_EMU.STABLE_KW, **extra)
    names = ["float32", "float64", "float16"]
    dts = [getattr(torch, names[i % 3] if dtype == "mixed" else dtype) for i in range(4)]
    strided = bool(kw["amsgrad"])
    hc, em, cpu = (_EMU._stable_params(dts, strided) for _ in range(3))
    compiled_ids.update(id(p) for p in hc)
    emulated_ids.update(id(p) for p in em)
    opts = [StableSPAMAdamW(ps, **kw, fused=True) for ps in (hc, em, cpu)]
    ref = [_EMU._f(p) for p in hc]
    oracle = _EMU.oracles.StableSpamOracle(
        _EMU.STABLE_SHAPES, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"],
        kw["amsgrad"], kw["gamma1"], kw["gamma2"], kw["gamma3"], kw["total_t"],
        kw["eta_min"], kw["update_proj_gap"],
    )  # fmt: skip
    rtol = {torch.float64: 1e-11, torch.float32: 5e-5, torch.float16: 1e-2}
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if kw["amsgrad"] else [])
    f, close = _EMU._f, _EMU._close
    for gs in _EMU._stable_grads():
        for group in (hc, em, cpu):
            for a, g in zip(group, gs, strict=True):
                a.grad = torch.tensor(g, dtype=a.dtype)
        launches.clear()
        for o in opts:
            o.step()
        assert {"fastclip_stable_spam", "fastclip_clipped_sq"} <= set(launches)
        with np.errstate(invalid="ignore", over="ignore"):
            oracle.step(ref, [f(p.grad) for p in hc])
        for i, (a, b, c) in enumerate(zip(hc, em, cpu, strict=True)):
            tol = rtol[a.dtype]
            half = a.dtype == torch.float16
            cancel, floor = (0.1, 2.0**-24 * 4) if half else (1e-2, 0.0)
            sa = opts[0].state[a]
            close(f(a), ref[i], tol, cancel)
            close(f(sa["exp_avg"]), oracle.m[i], tol, cancel, floor)
            close(f(sa["exp_avg_sq"]), oracle.v[i], tol, cancel, floor)
            same = 1e-13 if a.dtype == torch.float64 else 1e-6
            for other, st in ((b, opts[1].state[b]), (c, opts[2].state[c])):
                close(f(a), f(other), same)
                for key in [*keys, "m_max_t", "m_norm_t", "v_norm_t"]:
                    close(f(sa[key]).reshape(-1), f(st[key]).reshape(-1), same)
            if half:  # keep the reference on the stored values (16-bit rounding)
                ref[i], oracle.m[i], oracle.v[i] = f(a), f(sa["exp_avg"]), f(sa["exp_avg_sq"])
                for key, name in (
                    ("m_max_t", "m_max"),
                    ("m_norm_t", "m_norm"),
                    ("v_norm_t", "v_norm"),
                ):
                    getattr(oracle, name)[i] = float(sa[key])


@pytest.mark.parametrize("dtype", ["float32", "float64", "mixed"])
@pytest.mark.parametrize(
    "extra",
    [{}, dict(amsgrad=True, gamma1=-1), dict(total_t=None, weight_decay=0.0)],
    ids=["default", "amsgrad-strided", "no-schedule"],
)
def test_the_cuda_source_against_the_reference_the_emulation_and_the_cpu_route(
    library: Any, monkeypatch: pytest.MonkeyPatch, dtype: str, extra: dict
) -> None:
    _steps(library, monkeypatch, dtype, extra)


#: deliberate breaks of spam_kernels.cu, each caught by the steps above
BREAKS = {
    "second moment with beta1": ("f.b2 = (A)row[FC_Q_BETA2];", "f.b2 = (A)row[FC_Q_B1];"),
    "clipped sum of the tails unclipped": (
        "double c = (double)ada_clip((A)ld(g, i), hat, shrink);",
        "double c = (double)(A)ld(g, i);",
    ),
}


@pytest.mark.parametrize("what", list(BREAKS))
def test_a_broken_cuda_source_is_caught(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    old, new = BREAKS[what]
    src = _modules.source("spam")
    assert src.count(old) == 1
    with pytest.raises(AssertionError):
        _steps(_build(tmp_path, src.replace(old, new)), monkeypatch, "float32", {})
