"""Stable-SPAM's CUDA kernels (``fastclip_stable_spam`` and ``fastclip_clipped_sq`` of
``spam_kernels.cu``, compiled after ``kernels.cu`` and ``optim_kernels.cu`` as the GPU
route does) built for the host and run under the GPU driver (``fastclip/_gpu/_spam.py``)
through ``StableSPAMAdamW``, without a GPU.

The shim of ``tests/_host_cuda.py`` is used (every CUDA thread a host thread, the
correctly rounded intrinsics as the host's IEEE operations).  The
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

import pathlib
from typing import Any

import _host_cuda
import numpy as np
import pytest

from fastclip import _dispatch, _gpu
from fastclip._gpu import _modules

torch = pytest.importorskip("torch")

from fastclip.torch import StableSPAMAdamW  # noqa: E402

_EMU = _host_cuda.emulated_test_module("test_gpu_spam_emulated")
NAMES = ("fastclip_stable_spam", "fastclip_clipped_sq")


def _build(d: pathlib.Path, src: str) -> _host_cuda.Kernels:
    return _host_cuda.build(d, "stable", src, dict.fromkeys(NAMES, ("float", "double", "__half")))


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> _host_cuda.Kernels:
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
    _host_cuda.use(
        monkeypatch,
        kernel,
        GPU_BLOCK=64,
        GPU_MAX_BLOCKS=3,  # grid-stride loops over the chunks
        GPU_CHUNK=7,  # many chunks per array, ragged ends
    )
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
    library = _build(tmp_path, _host_cuda.broken("spam", *BREAKS[what]))
    with pytest.raises(AssertionError):
        _steps(library, monkeypatch, "float32", {})
