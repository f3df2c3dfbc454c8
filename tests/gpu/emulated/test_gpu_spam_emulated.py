"""The fused SPAM step's GPU driver (``_gpu/_spam.py``) run on the CPU against a NumPy
transcription of ``spam_kernels.cu``, checked against the float64 transcription of
the reference SPAM optimizer (``tests/integration/_spam_oracles.py``).

As ``test_gpu_optim_emulated.py`` does for AdamW: "device memory" is NumPy
memory, pointers are host addresses, and the kernel is replaced by a NumPy
transcription of its CUDA source that reads its table and hyper-parameter rows
through the raw addresses it is given, so a wrong argument order, table offset
or column gives wrong numbers here.  The CUDA source itself is compiled in
``tests/gpu/test_gpu_spam_compile.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib

import _gpu_emulation
import numpy as np
import pytest
from _gpu_emulation import mem

from fastclip import _config as cfg
from fastclip import _spam_hparams as H
from fastclip._gpu import _adapters, _modules, _spam, _tables

_spec = importlib.util.spec_from_file_location(
    "_spam_oracles_emulated",
    pathlib.Path(__file__).parents[2] / "integration" / "_spam_oracles.py",
)
oracles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracles)

DT = {"float": np.float32, "double": np.float64, "__half": np.float16}
LAUNCHES: list[str] = []


def _fma(a, b, c, acc):
    return (np.float64(a) * b + c).astype(acc) if acc == np.float32 else a * b + c


def _spam_kernel(dt):
    """fastclip_spam<T> of spam_kernels.cu, operation by operation."""

    def run(grid, block, args):
        ptrs, n_t, sizes, ct, cs, nc, chunk, hparams = args
        n_t, nc, chunk = int(n_t), int(nc), int(chunk)
        assert nc > 0 and n_t > 0 and int(hparams) != 0
        A = np.float64 if dt == np.float64 else np.float32
        table = mem(ptrs, 4 * n_t, np.uint64).reshape(4, n_t)
        size_a, ct_a, cs_a = mem(sizes, n_t, np.int64), mem(ct, nc, np.int64), mem(cs, nc, np.int64)
        rows = mem(hparams, n_t * H.P_COLS, np.float64).reshape(n_t, H.P_COLS)
        for k in range(nc):
            t, s = int(ct_a[k]), int(cs_a[k])
            n = int(size_a[t])
            e = min(s + chunk, n)
            p, g, m, v = (mem(table[j, t], n, dt)[s:e] for j in range(4))
            r = rows[t]
            b1, w1, b2, w2, eps, alpha, decay, theta = (A(x) for x in r[:8])
            mi = np.zeros(e - s, A) if r[H.P_RESET] else m.astype(A)
            vi = np.zeros(e - s, A) if r[H.P_RESET] else v.astype(A)
            gi = g.astype(A)
            if r[H.P_CLIP]:
                bound = vi * theta
                root = np.sqrt(bound)
                gi = np.where(gi * gi > bound, np.where(gi > 0, root, -root), gi)
            mi = _fma(gi, w1, mi * b1, A)
            vi = _fma(w2 * gi, gi, vi * b2, A)
            pi = p.astype(A) + (alpha * mi) / (np.sqrt(vi) + eps)
            if r[H.P_DECAY] != 0:
                pi = _fma(pi, decay, pi, A)
            p[:], m[:], v[:] = pi.astype(dt), mi.astype(dt), vi.astype(dt)

    return run


def _emulate(feature, device, name, targ):
    assert (feature, name) == ("spam", "fastclip_spam")
    LAUNCHES.append(targ)
    run = _spam_kernel(DT[targ])

    def launch(grid, block, args):
        with np.errstate(all="ignore"):  # NaN/inf propagate, as on the device
            run(grid, block, args)

    return launch


def _f64(a):
    return np.array(a, np.float64)  # always a copy: the oracle updates its arrays in place


class HostLib(_gpu_emulation.HostLib):
    kind = staticmethod(lambda x: str(x.dtype) if str(x.dtype) in _tables.ITEMSIZE else None)


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    monkeypatch.setattr(_modules, "kernel", _emulate)
    monkeypatch.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    monkeypatch.setattr(cfg, "GPU_CHUNK", 7)  # many chunks per array
    _tables.TABLES.clear()
    LAUNCHES.clear()


SHAPES = [(17,), (5, 3), (1,), (30,), (2, 2, 2)]
KW = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, wd=0.1, theta=50.0, delta_t=6, warmup=3, accu=2)


def _schedule(oracle):
    """(scale, reset, clips) of the oracle's next step, read from its counters."""
    t = oracle.total_step + 1
    clips = oracle.thres != 0 and t >= oracle.accu and t % oracle.delta_t >= oracle.accu
    return 1 - oracle.get_dr(oracle.current_step), t % oracle.delta_t == 0, clips


@pytest.mark.parametrize("dtype", [np.float32, np.float64, "mixed"])
def test_driver_against_the_reference(dtype):
    dts = [
        [np.float32, np.float64, np.float16][i % 3] if dtype == "mixed" else dtype
        for i in range(len(SHAPES))
    ]
    rng = np.random.default_rng(0)
    P = [rng.normal(size=s) for s in SHAPES]
    p = [a.astype(d) for a, d in zip(P, dts)]
    m = [np.zeros(s, d) for s, d in zip(SHAPES, dts)]
    v = [np.zeros(s, d) for s, d in zip(SHAPES, dts)]
    kw = KW
    oracle = oracles.SpamOracle(
        SHAPES, kw["lr"], kw["betas"], kw["eps"], kw["wd"], kw["theta"], kw["delta_t"],
        kw["warmup"], kw["accu"],
    )  # fmt: skip
    rtol = {np.float16: 5e-3, np.float32: 2e-5, np.float64: 1e-12}
    for k in range(1, 21):
        scale, reset, clips = _schedule(oracle)
        g = [rng.normal(size=s) * 0.1 for s in SHAPES]
        if k in (8, 15):
            g[0][3] *= 1e3  # a spike
        g = [a.astype(d) for a, d in zip(g, dts)]
        step = _spam.spam_prepare(HostLib, [p, g, m, v], "spam", "SPAMAdamW.step")
        rows = H.spam_rows(
            [k] * len(p), kw["lr"], *kw["betas"], kw["eps"], kw["wd"], True, scale, kw["theta"],
            clips, reset,
        )  # fmt: skip
        _spam.spam_run(HostLib, step, p, rows, "spam", False)
        oracle.step(P, [np.array(a, np.float64) for a in g])
        for i in range(len(SHAPES)):
            tol = rtol[dts[i]]
            scale_i = float(np.abs(P[i]).max())
            np.testing.assert_allclose(_f64(p[i]), P[i], rtol=tol, atol=tol * scale_i)
            np.testing.assert_allclose(_f64(m[i]), oracle.m[i], rtol=tol, atol=tol * 1e-2)
            # keep the reference on the stored values (16-bit rounding is not the point here)
            P[i], oracle.m[i], oracle.v[i] = _f64(p[i]), _f64(m[i]), _f64(v[i])
    assert len(LAUNCHES) == 20 * (3 if dtype == "mixed" else 1)


def test_bad_input_is_refused_before_any_launch():
    p = [np.ones(4, np.float32), np.ones(3, np.float32)]
    g = [np.ones(4, np.float32), np.ones(3, np.float32)]
    m = [np.zeros(4, np.float32), np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match="shape of its parameter"):
        _spam.spam_prepare(HostLib, [p, g, m, [np.zeros(4, np.float32)] * 2], "spam", "w")
    with pytest.raises(ValueError, match="share memory"):
        _spam.spam_prepare(HostLib, [p, g, m, [m[0], m[1]]], "spam", "w")
    with pytest.raises(TypeError, match="Stable-SPAM has no fused CUDA kernel"):
        _spam.spam_prepare(HostLib, [p, g, m, m, None], "stable_spam", "w")
    assert not LAUNCHES and all((a == 1).all() for a in p) and all((a == 0).all() for a in m)
