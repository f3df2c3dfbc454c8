"""The fused SPAM and Stable-SPAM steps' GPU driver (``_gpu/_spam.py``) run on the CPU
against NumPy transcriptions of ``spam_kernels.cu`` (and of the ``kernels.cu``
reductions Stable-SPAM reuses), checked against the float64 transcriptions of the
reference optimizers (``tests/integration/_spam_oracles.py``) and, for
Stable-SPAM, against the fused CPU route; plus the CUDA routing rule of both
optimizers (CuPy present or not).

As ``test_gpu_optim_emulated.py`` does for AdamW: "device memory" is NumPy
memory, pointers are host addresses, and the kernel is replaced by a NumPy
transcription of its CUDA source that reads its table and hyper-parameter rows
through the raw addresses it is given, so a wrong argument order, table offset
or column gives wrong numbers here.  The CUDA source itself is compiled in
``tests/gpu/test_gpu_spam_compile.py``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import pathlib
import sys

import _gpu_emulation
import numpy as np
import pytest
from _gpu_emulation import mem
from _stable_spam_emulation import (
    STABLE_KERNELS,
    STABLE_SHAPES,
    NumpyHostLib,
    TorchHostLib,
)
from _stable_spam_emulation import (
    close_to as _close,
)
from _stable_spam_emulation import (
    f64_copy as _f,
)
from _stable_spam_emulation import (
    stable_grads as _stable_grads,
)
from _stable_spam_emulation import (
    stable_params as _stable_params,
)

torch = pytest.importorskip("torch")

from fastclip import NonFiniteNormError, _dispatch, _gpu  # noqa: E402
from fastclip import _config as cfg  # noqa: E402
from fastclip import _spam_hparams as H  # noqa: E402
from fastclip._gpu import _adapters, _modules, _spam, _tables  # noqa: E402
from fastclip.torch import SPAMAdamW, StableSPAMAdamW, _spam_fused  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "_spam_oracles_emulated",
    pathlib.Path(__file__).parents[2] / "integration" / "_spam_oracles.py",
)
oracles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracles)

DT = {"float": np.float32, "double": np.float64, "__half": np.float16}
LAUNCHES: list[str] = []
STABLE_LAUNCHES: list[tuple[str, str]] = []


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
    if (feature, name) == ("spam", "fastclip_spam"):
        LAUNCHES.append(targ)  # the SPAM tests count these launches
        run = _spam_kernel(DT[targ])
    else:
        STABLE_LAUNCHES.append((name, targ))
        run = STABLE_KERNELS[(feature, name)](DT[targ])

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
    STABLE_LAUNCHES.clear()


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
    with pytest.raises(ValueError, match="shape of its parameter"):
        _spam.spam_prepare(HostLib, [p, g, m, m, [np.zeros(2, np.float32)] * 2], "stable_spam", "w")
    with pytest.raises(ValueError, match="kind must be"):
        _spam.spam_prepare(HostLib, [p, g, m, m], "adam", "w")
    assert (
        not LAUNCHES
        and not STABLE_LAUNCHES
        and all((a == 1).all() for a in p)
        and all((a == 0).all() for a in m)
    )


# ------------------------------------------------------------------ Stable-SPAM

STABLE_KW = dict(
    lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, amsgrad=False,
    gamma1=0.7, gamma2=0.9, gamma3=0.999, total_t=20, eta_min=0.5, update_proj_gap=7,
)  # fmt: skip


@pytest.fixture
def gpu_route(monkeypatch):
    """Route the fused steps of the optimizers whose params are in the returned set
    (by id) through the GPU driver and the emulated kernels; others keep the CPU route."""
    real = _dispatch.backend_for_step
    backend = _dispatch.Backend("gpu", _gpu, TorchHostLib)
    marked: set[int] = set()

    def pick(lists, what):
        return backend if id(lists[0][0]) in marked else real(lists, what)

    monkeypatch.setattr(_dispatch, "backend_for_step", pick)
    TorchHostLib.syncs = 0
    return marked


@pytest.mark.parametrize("dtype", ["float32", "float64", "mixed"])
@pytest.mark.parametrize(
    "extra, strided",
    [({}, False), (dict(amsgrad=True, gamma1=-1), True), (dict(total_t=None, weight_decay=0.0), False)],
    ids=["default", "amsgrad-strided", "no-schedule"],
)  # fmt: skip
def test_stable_spam_gpu_driver_against_the_reference_and_the_cpu_route(
    gpu_route, dtype, extra, strided
):
    """30 recorded steps (spikes, resets at 7, 14, 21, 28) of
    StableSPAMAdamW on the emulated GPU route, each compared with the float64
    transcription of stablespam.py and with the fused CPU route (Numba)."""
    kw = dict(STABLE_KW, **extra)
    names = ["float32", "float64", "float16"]
    dts = [getattr(torch, names[i % 3] if dtype == "mixed" else dtype) for i in range(4)]
    gpu, cpu = _stable_params(dts, strided), _stable_params(dts, strided)
    gpu_route.update(id(p) for p in gpu)
    og, oc = StableSPAMAdamW(gpu, **kw, fused=True), StableSPAMAdamW(cpu, **kw, fused=True)
    ref = [_f(p) for p in gpu]
    oracle = oracles.StableSpamOracle(
        STABLE_SHAPES, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"], kw["amsgrad"],
        kw["gamma1"], kw["gamma2"], kw["gamma3"], kw["total_t"], kw["eta_min"],
        kw["update_proj_gap"],
    )  # fmt: skip
    rtol = {torch.float64: 1e-11, torch.float32: 5e-5, torch.float16: 1e-2}
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if kw["amsgrad"] else [])
    for step, gs in enumerate(_stable_grads()):
        for a, b, g in zip(gpu, cpu, gs):
            a.grad, b.grad = torch.tensor(g, dtype=a.dtype), torch.tensor(g, dtype=a.dtype)
        STABLE_LAUNCHES.clear()
        og.step()
        oc.step()
        kernels = {name for name, _ in STABLE_LAUNCHES}
        assert "fastclip_stable_spam" in kernels and "fastclip_clipped_sq" in kernels
        with np.errstate(invalid="ignore", over="ignore"):
            oracle.step(ref, [_f(p.grad) for p in gpu])
        for i, (a, b) in enumerate(zip(gpu, cpu)):
            tol = rtol[a.dtype]
            # float16: its statistics and moments are stored in float16 (a few roundings
            # a step), second moments reach its subnormals
            half = a.dtype == torch.float16
            cancel, floor = (0.1, 2.0**-24 * 4) if half else (1e-2, 0.0)
            _close(_f(a), ref[i], tol, cancel)
            _close(_f(og.state[a]["exp_avg"]), oracle.m[i], tol, cancel, floor)
            _close(_f(og.state[a]["exp_avg_sq"]), oracle.v[i], tol, cancel, floor)
            assert og.state[a]["step"] == oracle.k[i] == oc.state[b]["step"]
            for key, want in (("m_max_t", oracle.m_max[i]), ("m_norm_t", oracle.m_norm[i])):
                assert float(og.state[a][key]) == pytest.approx(
                    float(want), rel=tol * 10, abs=1e-300
                )
            # the CPU route: the same operations, reductions summed in another order
            same = 1e-13 if a.dtype == torch.float64 else 1e-6
            _close(_f(a), _f(b), same)
            for key in [*keys, "m_max_t", "m_norm_t", "v_norm_t"]:
                _close(_f(og.state[a][key]).reshape(-1), _f(oc.state[b][key]).reshape(-1), same)
            if half:  # keep the reference on the stored values (16-bit rounding)
                st = og.state[a]
                ref[i], oracle.m[i], oracle.v[i] = _f(a), _f(st["exp_avg"]), _f(st["exp_avg_sq"])
                for key, name in (
                    ("m_max_t", "m_max"),
                    ("m_norm_t", "m_norm"),
                    ("v_norm_t", "v_norm"),
                ):
                    getattr(oracle, name)[i] = float(st[key])
        assert og.total_steps == oc.total_steps == step + 1
    # per step: max |g| and clipped norms (one copy to the host each), 3 kernels per dtype
    assert TorchHostLib.syncs == 2 * 30


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_stable_spam_gpu_policy_decides_before_any_write(gpu_route, policy):
    """A NaN gradient at step 5 with nonfinite="skip" / "error": the step is decided
    from the max |g| reduction alone; nothing else is launched and nothing changes."""
    params = _stable_params([torch.float32] * 4, False)
    gpu_route.update(id(p) for p in params)
    opt = StableSPAMAdamW(params, **STABLE_KW, nonfinite=policy, fused=True)
    for t, gs in enumerate(_stable_grads(steps=8, nonfinite_at=5)):
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=torch.float32)
        STABLE_LAUNCHES.clear()
        if t != 5:
            opt.step()
            continue
        before = copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in params]))
        if policy == "skip":
            opt.step()
            assert opt.last_step_skipped
        else:
            with pytest.raises(NonFiniteNormError, match="StableSPAMAdamW"):
                opt.step()
        assert {name for name, _ in STABLE_LAUNCHES} <= {
            "fastclip_partial_pow_sum", "fastclip_tensor_norms"
        }  # fmt: skip
        sd, ps = before
        assert opt.state_dict()["counters"] == sd["counters"]
        assert all(torch.equal(a, b) for a, b in zip(params, ps))
        for k, st in opt.state_dict()["state"].items():
            assert all(
                torch.equal(x, sd["state"][k][key]) for key, x in st.items() if torch.is_tensor(x)
            )


def test_stable_spam_reductions_against_numpy():
    """spam_reduce on its own: max |g| (NaN wins, zero-size 0) and the clipped sum of
    squares, per tensor in the caller's order across dtype groups and chunks."""
    rng = np.random.default_rng(3)
    sizes, dts = [17, 0, 5, 30, 1], [np.float32, np.float64, np.float16, np.float32, np.float64]
    g = [rng.normal(size=n).astype(d) for n, d in zip(sizes, dts)]
    g[3][4] = np.nan
    p, m, v = ([np.zeros(n, d) for n, d in zip(sizes, dts)] for _ in range(3))
    step = _spam.spam_prepare(NumpyHostLib, [p, g, m, v, None], "stable_spam", "w")
    hats = np.array([0.5, 1.0, np.inf, 0.3, 2.0])
    shrinks = np.array([0.25, 1.0, 1.0, np.nan, 0.5])
    got_max = _spam.spam_reduce(NumpyHostLib, step, 5, "max")
    got_sq = _spam.spam_reduce(NumpyHostLib, step, 5, "clipped_sq", hats, shrinks)
    for i, a in enumerate(g):
        a64 = a.astype(np.float64)
        want = np.nan if np.isnan(a64).any() else (np.abs(a64).max() if a.size else 0.0)
        np.testing.assert_equal(got_max[i], want)
        acc = np.float64 if a.dtype == np.float64 else np.float32
        with np.errstate(invalid="ignore"):
            c = np.where(np.abs(a.astype(acc)) > acc(hats[i]), a.astype(acc) * acc(shrinks[i]), a)
        np.testing.assert_allclose(got_sq[i], np.sum(c.astype(np.float64) ** 2), rtol=1e-14)
    assert not any(a.any() for a in p + m + v)  # the reductions write nothing


class _FakeCuda:
    """A stand-in for a CUDA tensor on a machine without one (``choose_route`` reads
    only the type, device and dtype)."""

    device = torch.device("cuda", 0)

    def __init__(self, dtype):
        self.dtype = dtype


@pytest.mark.parametrize("cls", [SPAMAdamW, StableSPAMAdamW])
def test_cuda_routing_with_and_without_cupy(monkeypatch, cls):
    """CUDA tensors take the fused CUDA route of both optimizers when CuPy sees a
    device; without CuPy, fused=None takes the foreach route and fused=True raises
    TypeError with the GPU route's reason (as documented in _spam_fused.py)."""
    monkeypatch.setattr(_spam_fused, "_PLAIN", (_FakeCuda,))
    ps = [_FakeCuda(torch.float32), _FakeCuda(torch.bfloat16)]
    work = [({}, ps, [_FakeCuda(torch.float32), _FakeCuda(torch.bfloat16)])]
    what = f"fastclip.torch.{cls.__name__}.step"
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    assert _spam_fused.choose_route(what, work, None, cls._CUDA) == "foreach"
    with pytest.raises(TypeError, match=rf"{cls.__name__}.step: fused=True, but .*needs CuPy"):
        _spam_fused.choose_route(what, work, True, cls._CUDA)
    monkeypatch.setattr(_dispatch, "check_gpu_available", lambda: None)  # CuPy sees a device
    assert _spam_fused.choose_route(what, work, None, cls._CUDA) == "cuda"
    assert _spam_fused.choose_route(what, work, True, cls._CUDA) == "cuda"
    assert _spam_fused.choose_route(what, work, False, cls._CUDA) == "foreach"
    odd = [({}, [_FakeCuda(torch.float32)], [_FakeCuda(torch.float64)])]  # a dtype pair
    assert _spam_fused.choose_route(what, odd, None, cls._CUDA) == "foreach"
