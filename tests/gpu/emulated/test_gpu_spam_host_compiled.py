"""The fused SPAM step's CUDA source (``spam_kernels.cu``, compiled after ``kernels.cu``
and ``optim_kernels.cu`` as the GPU route does) built for the host and run under its
GPU driver (``fastclip/_gpu/_spam.py``), without a GPU.

The shim of ``tests/_host_cuda.py`` is used (every CUDA thread a host thread,
``__half`` as ``_Float16``, the correctly rounded intrinsics of ``optim_kernels.cu``
as the host's IEEE operations) (``-ffp-contract=off``: no fused
multiply-adds but the kernel's own ``fma``).  ``fastclip_spam``'s launches go to that
library through ctypes, NumPy memory as device memory, and are checked against the
float64 reference optimizer (``tests/integration/_spam_oracles.py``) and the NumPy
transcription of the kernel (``test_gpu_spam_emulated.py``), as that file checks its
emulation.  (Stable-SPAM's kernels: test_gpu_stable_spam_host_compiled.py.)

Skips, with the reason, where no C++ compiler with C++20 ``<barrier>`` and
``_Float16`` (GCC 12, Clang 15) is on the PATH.
"""

from __future__ import annotations

import pathlib
from typing import Any

import _host_cuda as hc
import numpy as np
import pytest

from fastclip import _spam_hparams as H
from fastclip._gpu import _modules, _spam

torch = pytest.importorskip("torch")

_EMU = hc.emulated_test_module("test_gpu_spam_emulated")
NAME = "fastclip_spam"


def _build(d: pathlib.Path, src: str) -> hc.Kernels:
    return hc.build(d, "spam", src, {NAME: ("float", "double", "__half")})


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> hc.Kernels:
    return _build(tmp_path_factory.mktemp("cuda_spam_host"), _modules.source("spam"))


def _use(mp: pytest.MonkeyPatch, kernel: Any) -> None:
    hc.use(
        mp,
        kernel,
        GPU_CHUNK=7,  # many chunks per array, ragged ends
        GPU_BLOCK=64,
        GPU_MAX_BLOCKS=3,  # grid-stride loops over the chunks
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64, "mixed"])
def test_the_cuda_source_against_the_reference_and_the_emulation(
    library: hc.Kernels, monkeypatch: pytest.MonkeyPatch, dtype: Any
) -> None:
    _steps(library, monkeypatch, dtype)


#: deliberate breaks of spam_kernels.cu, each caught by the steps above
BREAKS = {
    "spike clip keeps the gradient": ("A root = sqrt_rn(bound);", "A root = gi;"),
    "second moment without beta2": (
        "vi = fused(mul(w2, gi), gi, mul(vi, b2));",
        "vi = fused(mul(w2, gi), gi, vi);",
    ),
}


@pytest.mark.parametrize("what", list(BREAKS))
def test_a_broken_cuda_source_is_caught(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    library = _build(tmp_path, hc.broken("spam", *BREAKS[what]))
    with pytest.raises(AssertionError):
        _steps(library, monkeypatch, np.float32)


def _steps(library: hc.Kernels, monkeypatch: pytest.MonkeyPatch, dtype: Any) -> None:
    """20 SPAM steps (resets, spike clipping, warm-up): the compiled kernel against the
    float64 reference optimizer, and against the emulation run on a copy of the state:
    float32 and float16 arrays bit for bit."""
    shapes = _EMU.SHAPES
    dts = [
        [np.float32, np.float64, np.float16][i % 3] if dtype == "mixed" else dtype
        for i in range(len(shapes))
    ]
    rng = np.random.default_rng(0)
    P = [rng.normal(size=s) for s in shapes]
    p = [a.astype(d) for a, d in zip(P, dts, strict=True)]
    m = [np.zeros(s, d) for s, d in zip(shapes, dts, strict=True)]
    v = [np.zeros(s, d) for s, d in zip(shapes, dts, strict=True)]
    kw = _EMU.KW
    oracle = _EMU.oracles.SpamOracle(
        shapes, kw["lr"], kw["betas"], kw["eps"], kw["wd"], kw["theta"], kw["delta_t"],
        kw["warmup"], kw["accu"],
    )  # fmt: skip
    rtol = {np.float16: 5e-3, np.float32: 2e-5, np.float64: 1e-12}
    launches: list[str] = []

    def compiled(feature: str, device: int, name: str, targ: str) -> Any:
        assert (feature, name) == ("spam", NAME)
        launches.append(targ)
        return library[(NAME, targ)]

    for k in range(1, 21):
        scale, reset, clips = _EMU._schedule(oracle)
        g = [rng.normal(size=s) * 0.1 for s in shapes]
        if k in (8, 15):
            g[0][3] *= 1e3  # a spike
        g = [a.astype(d) for a, d in zip(g, dts, strict=True)]
        rows = H.spam_rows(
            [k] * len(p), kw["lr"], *kw["betas"], kw["eps"], kw["wd"], True, scale, kw["theta"],
            clips, reset,
        )  # fmt: skip
        ep, em, ev = ([a.copy() for a in x] for x in (p, m, v))
        with monkeypatch.context() as mp:
            _use(mp, _EMU._emulate)
            step = _spam.spam_prepare(_EMU.HostLib, [ep, g, em, ev], "spam", "SPAMAdamW.step")
            _spam.spam_run(_EMU.HostLib, step, ep, rows, "spam", False)
        with monkeypatch.context() as mp:
            _use(mp, compiled)
            step = _spam.spam_prepare(_EMU.HostLib, [p, g, m, v], "spam", "SPAMAdamW.step")
            _spam.spam_run(_EMU.HostLib, step, p, rows, "spam", False)
        oracle.step(P, [np.array(a, np.float64) for a in g])
        for i in range(len(shapes)):
            tol = rtol[dts[i]]
            scale_i = float(np.abs(P[i]).max())
            f64 = _EMU._f64
            np.testing.assert_allclose(f64(p[i]), P[i], rtol=tol, atol=tol * scale_i)
            np.testing.assert_allclose(f64(m[i]), oracle.m[i], rtol=tol, atol=tol * 1e-2)
            for a, b in ((p, ep), (m, em), (v, ev)):  # the emulation's roundings
                if dts[i] == np.float64:  # its float64 fma is a * b + c: two roundings
                    ulps = 4 * np.spacing(np.abs(b[i]).max())  # (a few of the largest's)
                    np.testing.assert_allclose(a[i], b[i], rtol=0.0, atol=ulps)
                else:  # float32 and float16: bit for bit
                    np.testing.assert_array_equal(a[i], b[i])
            P[i], oracle.m[i], oracle.v[i] = f64(p[i]), f64(m[i]), f64(v[i])
    assert len(launches) == 20 * (3 if dtype == "mixed" else 1)
