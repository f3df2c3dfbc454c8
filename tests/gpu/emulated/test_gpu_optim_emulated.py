"""The fused optimizers' GPU driver (``_gpu/_optim.py``) run on the CPU against NumPy
emulations of ``optim_kernels.cu`` and of the core's norm kernels.

This file owns the fused optimizers' GPU driver's host side; shared emulation helpers
are in tests/_gpu_emulation.py.

As ``tests/gpu/emulated/test_gpu_host_emulated.py`` does for the core: "device memory" is
NumPy (or torch CPU) memory, pointers are host addresses, and each kernel is
replaced by a NumPy transcription of its CUDA source that reads its tables,
hyper-parameter rows, coefficient and guard through the raw addresses it is
given.  A wrong argument order, table offset, hyper-parameter column or guard
gives wrong numbers here, checked against float64 transcriptions of
``torch.optim.AdamW`` / ``SGD`` (and, for the torch drop-ins, against
``torch.optim`` itself after ``clip_grad_norm_``).
"""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction

import _gpu_emulation
import numpy as np
import pytest
import reference
from _gpu_emulation import mem

from fastclip import NonFiniteNormError
from fastclip import _config as cfg
from fastclip import _gpu as G
from fastclip import _hparams as K
from fastclip._gpu import _adapters, _modules, _tables
from fastclip.optim import _functional as F

DT = {"float": np.float32, "double": np.float64, "__half": np.float16}


def _mem(ptr, n, dtype):
    return mem(ptr, n, dtype, null_is_empty=True)  # null: an unused optional list


# ------------------------------------------------- emulated kernels (NumPy)


def _partial(dt):
    def run(grid, block, a):
        ptrs, sizes, ct, cs, nc, chunk, ord_code, p, partials = a
        nc = int(nc)
        ct_a, cs_a = _mem(ct, nc, np.int64), _mem(cs, nc, np.int64)
        n_t = int(ct_a.max()) + 1 if nc else 0
        ptr_a, size_a = _mem(ptrs, n_t, np.uint64), _mem(sizes, n_t, np.int64)
        out = _mem(partials, nc, np.float64)
        for c in range(nc):
            t, s = int(ct_a[c]), int(cs_a[c])
            x = np.abs(_mem(ptr_a[t], size_a[t], dt)[s : min(s + int(chunk), size_a[t])])
            x = x.astype(np.float64)
            if int(ord_code) == 0:
                out[c] = np.nan if np.isnan(x).any() else (x.max() if x.size else 0.0)
            else:
                out[c] = (x ** float(p)).sum()

    return run


def _finish(dt):
    def run(grid, block, a):
        partials, n, ord_code, p, max_norm, eps, mode, given, norm_out, coef_out = a
        v = _mem(partials, int(n), np.float64)
        if int(given):
            norm = float(_mem(given, 1, np.float64)[0])
        elif int(ord_code) == 0:
            norm = float(np.nan if np.isnan(v).any() else (v.max() if v.size else 0.0))
        else:
            norm = float(v.sum()) ** (1.0 / float(p))
        _mem(norm_out, 1, dt)[0] = norm
        with np.errstate(divide="ignore", invalid="ignore"):
            den = np.float64(norm) + np.float64(eps)
            r = np.float64(max_norm) / den
        _mem(coef_out, 1, np.float64)[0] = 1.0 if (int(mode) == 1 and (r >= 1.0 or den == 0)) else r

    return run


def _skips(mode, guard):
    if mode == 1:
        return not np.isfinite(_mem(guard, 1, np.float32)[0])
    if mode == 2:
        return not np.isfinite(_mem(guard, 1, np.float64)[0])
    if mode == 3:
        return not _mem(guard, 1, np.float64)[0] >= 0.0
    assert mode == 0
    return False


def _head(a, n_lists, dt):
    """Decode the common head of a fused kernel's arguments (as optim_kernels.cu does)."""
    ptrs, n_t, sizes, ct, cs, nc, chunk, coef_dev, coef_host, guard_mode, guard, hparams = a[:12]
    n_t, nc, chunk = int(n_t), int(nc), int(chunk)
    assert nc > 0 and n_t > 0
    acc = np.float64 if dt == np.float64 else np.float32
    if _skips(int(guard_mode), int(guard)):
        return None
    # clip_coef: the signed coefficient in float64 (times_coef applies it)
    c = float(coef_host) * (float(_mem(coef_dev, 1, np.float64)[0]) if int(coef_dev) else 1.0)
    table = dict(
        ptrs=_mem(ptrs, n_lists * n_t, np.uint64).reshape(n_lists, n_t),
        sizes=_mem(sizes, n_t, np.int64),
        ct=_mem(ct, nc, np.int64),
        cs=_mem(cs, nc, np.int64),
        nc=nc,
        chunk=chunk,
        n_t=n_t,
        hparams=int(hparams),
    )
    return table, acc, c


def _chunks(tab, n_lists, dt):
    for k in range(tab["nc"]):
        t, s = int(tab["ct"][k]), int(tab["cs"][k])
        n = int(tab["sizes"][t])
        e = min(s + tab["chunk"], n)
        assert 0 <= s < e
        yield t, [_mem(tab["ptrs"][j, t], n, dt)[s:e] for j in range(n_lists)]


def _fma(a, b, c, acc):
    """__fmaf_rn / __fma_rn: a * b + c rounded once to ``acc``."""
    a, b, c = np.broadcast_arrays(*(np.asarray(v, acc) for v in (a, b, c)))
    if acc == np.float32:
        # a * b is exact in float64; the float64 sum is rounded to odd (the sticky
        # bit set when inexact) so that the one rounding to float32 is correct --
        # a plain float64 sum would round twice
        prod = a.astype(np.float64) * b
        s = prod + c
        bb = s - prod
        err = (prod - (s - bb)) + (c.astype(np.float64) - bb)  # Knuth's TwoSum
        even = (s.view(np.int64) & 1) == 0
        bump = np.isfinite(s) & (err != 0) & even
        s = np.where(bump, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return s.astype(np.float32)
    out = a * b + c  # NaN and inf as the fused operation gives them
    for i in zip(*np.nonzero(np.isfinite(a) & np.isfinite(b) & np.isfinite(c))):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        out[i] = float(exact)  # correctly rounded (may overflow to inf)
    return out


def _adamw(dt):
    def run(grid, block, a):
        head = _head(a, 5, dt)
        if head is None:
            return
        tab, A, c = head
        scal = np.array([float(x) for x in a[12:19]])
        ams = int(a[19])
        rows = _mem(tab["hparams"], tab["n_t"] * K.A_COLS, np.float64).reshape(-1, K.A_COLS)
        for t, (p, g, m, v, x) in _chunks(tab, 5, dt):
            row = rows[t] if tab["hparams"] else scal
            decay, w1, b2, w2, eps, neg_step, bc2 = (A(r) for r in row)
            gi = _gpu_emulation.times_coef(g.astype(A), c, A)
            mi = m.astype(A)
            if row[K.A_W1] < 0.5:
                mi = _fma(w1, gi - mi, mi, A)
            else:
                mi = _fma(A(w1 - A(1)), gi - mi, gi, A)
            vi = v.astype(A) * b2
            vi = _fma(w2 * gi, gi, vi, A)
            vd = vi
            if ams:
                vm = x.astype(A)
                vd = np.where(vm >= vi, vm, vi)
                x[:] = vd.astype(dt)
            den = np.sqrt(vd) / bc2 + eps
            p[:] = (p.astype(A) * decay + neg_step * mi / den).astype(dt)
            m[:] = mi.astype(dt)
            v[:] = vi.astype(dt)

    return run


def _sgd(dt):
    def run(grid, block, a):
        head = _head(a, 3, dt)
        if head is None:
            return
        tab, A, c = head
        scal = np.array([float(x) for x in a[12:16]] + [float(a[16]), float(a[17])])
        rows = _mem(tab["hparams"], tab["n_t"] * K.S_COLS, np.float64).reshape(-1, K.S_COLS)
        for t, (p, g, b) in _chunks(tab, 3, dt):
            row = rows[t] if tab["hparams"] else scal
            wd, mom, damp1, neg_lr = (A(r) for r in row[:4])
            mode, nesterov = int(row[K.S_MODE]), row[K.S_NESTEROV] != 0
            pi = p.astype(A)
            gi = _gpu_emulation.times_coef(g.astype(A), c, A)
            if row[K.S_WD] != 0:
                gi = _fma(pi, wd, gi, A)
            if mode != 0:
                bi = gi if mode == 1 else _fma(gi, damp1, b.astype(A) * mom, A)
                b[:] = bi.astype(dt)
                gi = _fma(bi, mom, gi, A) if nesterov else bi
            p[:] = _fma(gi, neg_lr, pi, A).astype(dt)

    return run


EMULATED = {
    "fastclip_partial_pow_sum": _partial,
    "fastclip_finish": _finish,
    "fastclip_adamw": _adamw,
    "fastclip_sgd": _sgd,
}
LAUNCHES: list[str] = []


def _emulate(device, name, targ):
    LAUNCHES.append(name)
    run = EMULATED[name](DT[targ])

    def launch(grid, block, args):
        with np.errstate(all="ignore"):  # NaN/inf propagate, as on the device
            run(grid, block, args)

    return launch


class HostLib(_gpu_emulation.HostLib):
    """The GPU adapter interface over NumPy memory (pointers = host addresses)."""

    kind = staticmethod(lambda x: str(x.dtype) if str(x.dtype) in _tables.ITEMSIZE else None)
    device_id = staticmethod(lambda x: 1 if getattr(x, "_other_device", False) else 0)


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    monkeypatch.setattr(
        _modules, "kernel", lambda feature, device, name, targ: _emulate(device, name, targ)
    )
    monkeypatch.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    monkeypatch.setattr(
        G, "on_device", lambda lib, like: contextlib.nullcontext()
    )  # the torch drop-ins' lookup
    monkeypatch.setattr(cfg, "GPU_CHUNK", 7)  # many chunks per array
    monkeypatch.setattr(HostLib, "syncs", 0)
    _tables.TABLES.clear()
    LAUNCHES.clear()


# ------------------------------------------------------ float64 references


SHAPES = [(17,), (5, 3), (0,), (1,), (30,), (2, 2, 2)]
RTOL = {np.float16: 5e-3, np.float32: 2e-5, np.float64: 1e-12}


def _dtypes(mode):
    if mode == "mixed":  # three dtype groups, interleaved: hparams rows by index
        return [[np.float32, np.float64, np.float16][i % 3] for i in range(len(SHAPES))]
    return [mode] * len(SHAPES)


def _f64(a):
    return np.array(a, np.float64)  # always a copy: references must not alias the arrays


def _norm(gs):
    return math.sqrt(sum(float(np.sum(_f64(g) ** 2)) for g in gs))


CLIPS = ["none", "max_norm", "total_host", "total_device", "coef_host", "coef_device"]


def _clip_args(clip, gs, max_norm=1.5):
    """(kwargs for the driver, the coefficient a torch user would apply)."""
    total = _norm(gs)
    coef = min(1.0, max_norm / (total + 1e-6))
    if clip == "none":
        return dict(max_norm=None, total_norm=None, clip_coef=None), 1.0
    if clip == "max_norm":
        return dict(max_norm=max_norm, total_norm=None, clip_coef=None), coef
    if clip == "total_host":
        return dict(max_norm=max_norm, total_norm=2.0 * total, clip_coef=None), min(
            1.0, max_norm / (2.0 * total + 1e-6)
        )
    if clip == "total_device":
        return dict(max_norm=max_norm, total_norm=np.asarray(2.0 * total), clip_coef=None), min(
            1.0, max_norm / (2.0 * total + 1e-6)
        )
    if clip == "coef_host":
        return dict(max_norm=None, total_norm=None, clip_coef=0.3), 0.3
    return dict(max_norm=None, total_norm=None, clip_coef=np.asarray(0.3)), 0.3


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("steps", ["uniform", "per_tensor"])
@pytest.mark.parametrize("mode", [np.float32, np.float64, "mixed"])
def test_adamw_against_float64_reference(clip, amsgrad, maximize, steps, mode):
    rng = np.random.default_rng(0)
    dts = _dtypes(mode)
    P = [rng.normal(size=s) for s in SHAPES]
    M = [np.zeros(s) for s in SHAPES]
    V = [np.zeros(s) for s in SHAPES]
    X = [np.zeros(s) for s in SHAPES] if amsgrad else None
    p = [a.astype(d) for a, d in zip(P, dts)]
    m = [a.astype(d) for a, d in zip(M, dts)]
    v = [a.astype(d) for a, d in zip(V, dts)]
    x = [a.astype(d) for a, d in zip(X, dts)] if amsgrad else None
    lr, b1, b2, eps, wd = 1e-2, 0.8, 0.99, 1e-6, 0.1
    for k in range(1, 4):
        step = [k + i for i in range(len(SHAPES))] if steps == "per_tensor" else k
        g = [(rng.normal(size=s) * 3).astype(d) for s, d in zip(SHAPES, dts)]
        kwargs, coef = _clip_args(clip, g)
        counts = F._steps(step, len(p))
        hparams = F.adamw_hparams(counts, lr, b1, b2, eps, wd)
        norm = G.adamw_step_gpu(
            HostLib, p, g, m, v, x, hparams, maximize, kwargs["max_norm"], 2.0,
            kwargs["total_norm"], kwargs["clip_coef"], 1e-6, "propagate",
        )  # fmt: skip
        if clip == "max_norm":
            assert float(norm) == pytest.approx(_norm(g), rel=1e-6)
        elif clip.startswith("total"):
            assert float(norm) == pytest.approx(2.0 * _norm(g), rel=1e-6)
        else:
            assert norm is None
        sign = -1.0 if maximize else 1.0
        for i in range(len(SHAPES)):
            P[i], M[i], V[i], xi = reference.adamw_step(
                P[i], _f64(g[i]), M[i], V[i], X[i] if X else None, counts[i],
                lr, b1, b2, eps, wd, sign * coef,
            )  # fmt: skip
            if X:
                X[i] = xi
            rtol = RTOL[dts[i]]
            np.testing.assert_allclose(_f64(p[i]), P[i], rtol=rtol, atol=rtol * 1e-2)
            np.testing.assert_allclose(_f64(m[i]), M[i], rtol=rtol, atol=rtol * 1e-2)
            np.testing.assert_allclose(_f64(v[i]), V[i], rtol=rtol, atol=rtol * 1e-2)
            if X:
                np.testing.assert_allclose(_f64(x[i]), X[i], rtol=rtol, atol=rtol * 1e-2)
            # keep the reference on the stored values (16-bit rounding is not the point here)
            P[i], M[i], V[i] = _f64(p[i]), _f64(m[i]), _f64(v[i])
            if X:
                X[i] = _f64(x[i])
    assert HostLib.syncs == 0  # "propagate": the host never reads device memory
    n_groups = 3 if mode == "mixed" else 1
    assert LAUNCHES.count("fastclip_adamw") == 3 * n_groups


SGD_VARIANTS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    dict(momentum=0.0, dampening=0.0, weight_decay=0.05, nesterov=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.05, nesterov=False),
    dict(momentum=0.8, dampening=0.0, weight_decay=0.05, nesterov=True),
]


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("variant", range(len(SGD_VARIANTS)))
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("mode", [np.float32, np.float64, "mixed"])
def test_sgd_against_float64_reference(clip, variant, maximize, mode):
    hv = SGD_VARIANTS[variant]
    rng = np.random.default_rng(1)
    dts = _dtypes(mode)
    P = [rng.normal(size=s) for s in SHAPES]
    B = [np.full(s, np.nan) for s in SHAPES]  # the first step must ignore old content
    p = [a.astype(d) for a, d in zip(P, dts)]
    b = [a.astype(d) for a, d in zip(B, dts)]
    lr = 0.05
    for k in range(3):
        g = [(rng.normal(size=s) * 3).astype(d) for s, d in zip(SHAPES, dts)]
        kwargs, coef = _clip_args(clip, g)
        # all first on step 0; on step 1 every other buffer is reset (per-tensor modes)
        first = [k == 0 or (k == 1 and i % 2 == 1) for i in range(len(SHAPES))]
        hparams = F.sgd_hparams(
            len(p), lr, hv["momentum"], hv["dampening"], hv["weight_decay"], hv["nesterov"], first
        )
        bufs = b if hv["momentum"] else None
        G.sgd_step_gpu(
            HostLib, p, g, bufs, hparams, maximize, kwargs["max_norm"], 2.0,
            kwargs["total_norm"], kwargs["clip_coef"], 1e-6, "propagate",
        )  # fmt: skip
        sign = -1.0 if maximize else 1.0
        for i in range(len(SHAPES)):
            P[i], B[i] = reference.sgd_step(
                P[i], _f64(g[i]), B[i], lr, hv["momentum"], hv["dampening"],
                hv["weight_decay"], hv["nesterov"], first[i], sign * coef,
            )  # fmt: skip
            rtol = RTOL[dts[i]]
            np.testing.assert_allclose(_f64(p[i]), P[i], rtol=rtol, atol=rtol * 1e-2)
            P[i] = _f64(p[i])
            if hv["momentum"]:
                np.testing.assert_allclose(_f64(b[i]), B[i], rtol=rtol, atol=rtol * 1e-2)
                B[i] = _f64(b[i])
    assert HostLib.syncs == 0


def _adamw_lists(n=3, value=1.0, dtype=np.float32):
    p = [np.full(5 + i, value, dtype) for i in range(n)]
    g = [np.full(5 + i, 0.5, dtype) for i in range(n)]
    m = [np.zeros(5 + i, dtype) for i in range(n)]
    v = [np.zeros(5 + i, dtype) for i in range(n)]
    return p, g, m, v


def _call_adamw(p, g, m, v, policy, x=None, **kw):
    args = dict(max_norm=1.0, total_norm=None, clip_coef=None)
    args.update(kw)
    hparams = F.adamw_hparams([1.0] * len(p), 1e-2, 0.9, 0.999, 1e-8, 0.01)
    return G.adamw_step_gpu(
        HostLib, p, g, m, v, x, hparams, False, args["max_norm"], 2.0,
        args["total_norm"], args["clip_coef"], 1e-6, policy,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skip_is_decided_by_the_kernel_without_a_sync(dtype, bad):
    p, g, m, v = _adamw_lists(dtype=dtype)
    g[1][2] = bad
    before = [a.copy() for a in p + m + v]
    norm = _call_adamw(p, g, m, v, "skip")
    assert not np.isfinite(float(norm))
    assert HostLib.syncs == 0
    assert "fastclip_adamw" in LAUNCHES  # launched: the guard inside the kernel skipped it
    for a, b in zip(p + m + v, before):
        np.testing.assert_array_equal(a, b)
    g[1][2] = 0.5  # a finite norm: the same guard lets the step through
    _call_adamw(p, g, m, v, "skip")
    assert not np.array_equal(p[0], before[0])


def test_skip_with_a_device_clip_coef_and_a_host_one():
    p, g, m, v = _adamw_lists()
    before = [a.copy() for a in p]
    _call_adamw(p, g, m, v, "skip", max_norm=None, clip_coef=np.asarray(np.nan))
    _call_adamw(p, g, m, v, "skip", max_norm=None, clip_coef=np.asarray(-1.0))
    n_launches = LAUNCHES.count("fastclip_adamw")
    assert n_launches == 2  # device coefficients: the kernel decides
    _call_adamw(p, g, m, v, "skip", max_norm=None, clip_coef=math.nan)
    assert LAUNCHES.count("fastclip_adamw") == n_launches  # host coefficient: no launch
    _call_adamw(p, g, m, v, "skip", max_norm=1.0, total_norm=math.inf)
    assert LAUNCHES.count("fastclip_adamw") == n_launches
    for a, b in zip(p, before):
        np.testing.assert_array_equal(a, b)
    assert HostLib.syncs == 0


def test_error_raises_before_any_write_with_one_sync():
    p, g, m, v = _adamw_lists()
    g[0][0] = np.nan
    before = [a.copy() for a in p + m + v]
    with pytest.raises(NonFiniteNormError, match="non-finite"):
        _call_adamw(p, g, m, v, "error")
    assert HostLib.syncs == 1
    with pytest.raises(NonFiniteNormError, match="coefficient"):
        _call_adamw(p, g, m, v, "error", max_norm=None, clip_coef=np.asarray(np.nan))
    assert HostLib.syncs == 2
    assert "fastclip_adamw" not in LAUNCHES
    for a, b in zip(p + m + v, before):
        np.testing.assert_array_equal(a, b)


def test_propagate_turns_parameters_nan():
    p, g, m, v = _adamw_lists()
    g[2][0] = np.inf
    _call_adamw(p, g, m, v, "propagate")
    assert HostLib.syncs == 0
    assert np.isnan(p[2][0]) and np.isfinite(p[0]).all()  # coef 0: inf * 0 is NaN, as torch
    g[2][0] = np.nan
    _call_adamw(p, g, m, v, "propagate")
    assert np.isnan(p[0]).all()


def test_non_contiguous_arrays_go_through_copies():
    base = np.ones((6, 8), np.float32)
    p = [base[:, ::2], np.ones(4, np.float32)]
    g = [np.full((6, 4), 0.5, np.float32)[:, ::-1], np.full(4, 0.5, np.float32)]
    m = [np.zeros((6, 4), np.float32), np.zeros(4, np.float32)]
    v = [np.zeros((6, 4), np.float32).T.copy().T, np.zeros(4, np.float32)]
    _call_adamw(p, g, m, v, "propagate", max_norm=None)
    ref = reference.adamw_step(1.0, 0.5, 0.0, 0.0, None, 1, 1e-2, 0.9, 0.999, 1e-8, 0.01, 1.0)[0]
    np.testing.assert_allclose(p[0], np.full((6, 4), ref), rtol=1e-6)
    np.testing.assert_array_equal(base[:, 1::2], 1.0)  # the neighbours are untouched
    np.testing.assert_allclose(v[0], 0.001 * 0.25, rtol=1e-5)


@pytest.mark.parametrize(
    "case", ["shape", "dtype", "overlap", "state_overlap", "device", "count", "complex"]
)
@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_bad_input_raises_before_any_write(case, nonfinite):
    p, g, m, v = _adamw_lists()
    if case == "shape":
        m[1] = np.zeros(3, np.float32)
    elif case == "dtype":
        v[2] = v[2].astype(np.float64)
    elif case == "overlap":
        big = np.ones(20, np.float32)
        p[0], p[1] = big[:5], big[3:9]
    elif case == "state_overlap":
        m[0] = p[0]
    elif case == "device":

        class Other(np.ndarray):
            _other_device = True

        g[1] = g[1].view(Other)
    elif case == "count":
        g = g[:2]
    elif case == "complex":
        p[0] = p[0].astype(np.complex64)
        g[0], m[0], v[0] = (a.astype(np.complex64) for a in (g[0], m[0], v[0]))
    if nonfinite == "skip":  # a NaN norm must not hide the bad call
        g[0] = g[0].copy()
        g[0].reshape(-1)[0] = np.nan
    before = [a.copy() for a in p + m + v]
    with pytest.raises((TypeError, ValueError)):
        _call_adamw(p, g, m, v, nonfinite)
    assert not LAUNCHES
    for a, b in zip(p + m + v, before):
        np.testing.assert_array_equal(a, b)


def test_tables_are_cached_and_uniform_hyperparameters_upload_nothing():
    p, g, m, v = _adamw_lists()
    _call_adamw(p, g, m, v, "propagate")
    n = len(_tables.TABLES)  # the step's table and the norm's table
    assert n == 2
    _call_adamw(p, g, m, v, "propagate")
    assert len(_tables.TABLES) == n
    hparams = F.adamw_hparams([1.0, 2.0, 3.0], 1e-2, 0.9, 0.999, 1e-8, 0.01)
    G.adamw_step_gpu(HostLib, p, g, m, v, None, hparams, False, None, 2.0, None, None, 1e-6, "skip")
    assert len(_tables.TABLES) == n + 1  # per-tensor rows: one upload


def test_source_helpers():
    names = _modules.name_expressions("optim")
    assert len(names) == 8 and all(n.startswith("fastclip_") for n in names)
    text = _modules.explicit_instantiations("optim")
    assert text.count("template __global__ void") == 8
    assert "<__nv_bfloat16>" in text and "T*" not in text
    # the kernel's column macros are the CPU kernels' columns
    src = _modules.source("optim")
    for name in ("A_DECAY", "A_W1", "A_BETA2", "A_W2", "A_EPS", "A_NEG_STEP", "A_BC2_SQRT",
                 "A_COLS", "S_WD", "S_MOMENTUM", "S_DAMP1", "S_NEG_LR", "S_MODE",
                 "S_NESTEROV", "S_COLS"):  # fmt: skip
        assert f"#define FC_{name} {getattr(K, name)}\n" in src


# ------------------------------------------ torch drop-ins, "GPU" route emulated


torch = pytest.importorskip("torch")


class TorchHostLib(HostLib):
    """torch CPU tensors through the GPU adapter interface (name "torch")."""

    name = "torch"
    kind = staticmethod(
        lambda x: str(x.dtype).replace("torch.", "") if x.is_floating_point() else None
    )
    ptr = staticmethod(lambda x: x.data_ptr())
    numel = staticmethod(lambda x: x.numel())
    contiguous = staticmethod(lambda x: x.is_contiguous())
    as_contiguous = staticmethod(lambda x: x.detach().contiguous())
    empty = staticmethod(lambda shape, kind, like: torch.empty(shape, dtype=getattr(torch, kind)))
    to_f64 = staticmethod(lambda v: v.detach().to(torch.float64).reshape(()))
    upload = staticmethod(lambda buf, like: (torch.from_numpy(buf.copy()), None))

    @staticmethod
    def write_back(x, values):
        x.detach().copy_(values)

    @classmethod
    def host_float(cls, x):
        cls.syncs += 1
        return float(x.item())


@pytest.fixture
def torch_route(monkeypatch):
    import fastclip._gpu
    from fastclip import _dispatch
    from fastclip.torch import FusedAdamW, FusedSGD

    backend = _dispatch.Backend(_dispatch.ROUTE_GPU, fastclip._gpu, TorchHostLib)
    monkeypatch.setattr(_dispatch, "backend_for_step", lambda lists, what: backend)
    monkeypatch.setattr(TorchHostLib, "syncs", 0)
    return FusedAdamW, FusedSGD


def _model(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(
        dtype
    )


def _train_and_compare(ref, ours, opt_ref, opt, steps):
    """``steps`` of torch's clip_grad_norm_ + optimizer on ``ref`` and the fused
    clip + step on ``ours``; then the parameters must agree to float64 rounding."""
    x = torch.randn(8, 6, dtype=torch.float64)
    for _ in range(steps):
        for mdl in (ref, ours):
            mdl.zero_grad()
            mdl(x).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_ref.step()
        opt.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_fused_adamw_gpu_path_matches_torch(torch_route, amsgrad, maximize):
    FusedAdamW, _ = torch_route
    ref, ours = _model(0), _model(0)
    groups = lambda mdl: [  # noqa: E731 - two groups: per-group hyper-parameters, one launch
        {"params": list(mdl[0].parameters()), "weight_decay": 0.0},
        {"params": list(mdl[2].parameters()), "lr": 3e-2},
    ]
    kw = dict(lr=1e-2, betas=(0.85, 0.99), weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    opt_ref = torch.optim.AdamW(groups(ref), **kw)
    opt = FusedAdamW(groups(ours), max_norm=0.5, **kw)
    _train_and_compare(ref, ours, opt_ref, opt, steps=5)
    assert LAUNCHES.count("fastclip_adamw") == 5
    assert TorchHostLib.syncs == 0
    assert opt.state[next(ours.parameters())]["step"].item() == 5


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_gpu_path_matches_torch(torch_route, nesterov):
    _, FusedSGD = torch_route
    ref, ours = _model(1), _model(1)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    opt_ref = torch.optim.SGD(ref.parameters(), **kw)
    opt = FusedSGD(ours.parameters(), max_norm=0.5, **kw)
    _train_and_compare(ref, ours, opt_ref, opt, steps=4)
    assert TorchHostLib.syncs == 0


def test_fused_adamw_gpu_path_skip_reads_the_norm_once(torch_route):
    FusedAdamW, _ = torch_route
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = FusedAdamW([w], max_norm=1.0, nonfinite="skip")
    w.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0], dtype=torch.float64)
    opt.step()
    assert opt.last_step_skipped and TorchHostLib.syncs == 1
    torch.testing.assert_close(w.detach(), torch.ones(4, dtype=torch.float64))
    assert "fastclip_adamw" not in LAUNCHES
    assert len(opt.state[w]) == 0 or opt.state[w]["step"].item() == 0


def _overlapping_params():
    base = torch.arange(10.0, dtype=torch.float64)
    p1 = torch.nn.Parameter(base[0:6])  # Parameter shares the storage: they overlap
    p2 = torch.nn.Parameter(base[3:9])
    p1.grad = torch.full((6,), 0.5, dtype=torch.float64)
    p2.grad = torch.full((6,), -0.25, dtype=torch.float64)
    return p1, p2


def _opt_bytes(opt, tensors):
    sd = opt.state_dict()
    state = {k: {n: t.numpy().tobytes() for n, t in v.items()} for k, v in sd["state"].items()}
    return state, [t.detach().numpy().tobytes() for t in tensors]


@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
@pytest.mark.parametrize("which", ["adamw", "sgd"])
def test_fused_gpu_path_refused_step_changes_nothing(torch_route, which, nonfinite):
    """Validation (here: written memory shared) comes before the norm, the skip
    decision, any write and any new state; the next valid step is torch's first."""
    FusedAdamW, FusedSGD = torch_route
    p1, p2 = _overlapping_params()
    if nonfinite == "skip":
        p1.grad[0] = float("nan")  # a NaN norm must not hide the bad call
    kw = dict(lr=0.1, max_norm=0.5, nonfinite=nonfinite)
    opt = FusedAdamW([p1, p2], **kw) if which == "adamw" else FusedSGD([p1, p2], momentum=0.9, **kw)
    before = _opt_bytes(opt, [p1, p2, p1.grad, p2.grad])
    for _ in range(2):
        with pytest.raises(ValueError, match="share"):
            opt.step()
        assert _opt_bytes(opt, [p1, p2, p1.grad, p2.grad]) == before
    assert not opt.state.get(p1) and not opt.state.get(p2)
    assert not any(name in LAUNCHES for name in ("fastclip_adamw", "fastclip_sgd"))
    p2.grad = None
    p1.grad[0] = 0.5
    q = p1.detach().clone().requires_grad_()
    q.grad = p1.grad.clone()
    if which == "adamw":
        ref = torch.optim.AdamW([q], lr=0.1)
    else:
        ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    torch.nn.utils.clip_grad_norm_([q], 0.5)
    ref.step()
    opt.step()
    torch.testing.assert_close(p1.detach(), q.detach(), rtol=1e-12, atol=1e-14)
    if which == "adamw":
        assert opt.state[p1]["step"].item() == 1
    else:
        torch.testing.assert_close(
            opt.state[p1]["momentum_buffer"], ref.state[q]["momentum_buffer"]
        )


# ------------------------------------- coefficients float32 cannot hold


#: Clip coefficients float32 flushes to 0 (1e-60: 1e30 gradients clipped to 1e-30),
#: holds as a subnormal with few digits (1e-41, 3e-39) or overflows (1e39), and an
#: ordinary one (0.37); the cases of test_gpu_optim_host_compiled.py's
#: test_coefficients_outside_float32_give_the_cpu_routes_bits.
OUT_OF_RANGE_COEFS = (1e-60, 1e-41, 3e-39, 1e39, 0.37)


def _big_lists(dtype, seed):
    """AdamW lists of 1e30 float32 gradients (1e3 in float64 and float16), seven of
    them 0, zero moments: a flushed or overflowed coefficient shows in the moments
    (0, or 0 * inf = NaN where the product is 0)."""
    rng = np.random.default_rng(seed)
    big = 1e30 if dtype == np.float32 else 1e3
    sizes = (37, 1, 20, 9, 0)
    p = [(rng.normal(size=n) * 2).astype(dtype) for n in sizes]
    g = [(rng.normal(size=n) * 2 * big).astype(dtype) for n in sizes]
    g[2][:7] = 0.0
    m = [np.zeros(n, dtype) for n in sizes]
    v = [np.zeros(n, dtype) for n in sizes]
    x = [np.zeros(n, dtype) for n in sizes]
    return p, g, m, v, x


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("where", ["host", "device"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_coefficients_outside_float32_give_the_cpu_routes_bits(dtype, where, maximize):
    """optim_kernels.cu's times_coef, emulated: a coefficient float32 cannot hold is
    applied in float64 and the product rounded once, as the CPU route does; AdamW
    (amsgrad) and SGD with momentum give the CPU route's bits, and the first moment
    is (1 - beta1) * g * c of the exact rationals to float32 rounding."""
    import fastclip.optim as optim

    hv = SGD_VARIANTS[3]
    for c in OUT_OF_RANGE_COEFS:
        ours = _big_lists(dtype, 9)
        cpu = [[a.copy() for a in lst] for lst in ours]
        given = np.asarray(c) if where == "device" else c
        p, g, m, v, x = ours
        hparams = F.adamw_hparams([1.0] * len(p), 1e-2, 0.85, 0.99, 1e-6, 0.1)
        G.adamw_step_gpu(
            HostLib, p, g, m, v, x, hparams, maximize, None, 2.0, None, given, 1e-6, "propagate"
        )
        cp, cg, cm, cv, cx = cpu
        optim.adamw_step_(
            cp, cg, cm, cv, step=1, lr=1e-2, betas=(0.85, 0.99), eps=1e-6, weight_decay=0.1,
            max_exp_avg_sqs=cx, maximize=maximize, clip_coef=c,
        )  # fmt: skip
        for got, want in zip(p + m + v + x, cp + cm + cv + cx, strict=True):
            np.testing.assert_array_equal(got, want)
        # the first moment (1 - beta1) * g * c where it fits the dtype (not 1e30 * 1e39)
        q = (1 - Fraction(0.85)) * Fraction(c) * (-1 if maximize else 1)
        for mi, gi in zip(m, g, strict=True):
            exact = np.asarray([float(Fraction(float(e)) * q) for e in gi], np.float64)
            fits = np.abs(exact) <= np.finfo(dtype).max
            assert fits.all() or c > 1.0
            want = exact[fits].astype(dtype)  # float16 flushes these moments: 0 is right
            tiny = np.finfo(dtype).smallest_subnormal
            np.testing.assert_allclose(mi[fits], want, rtol=RTOL[dtype] / 10, atol=tiny)
        b = [np.zeros_like(a) for a in p]
        G.sgd_step_gpu(
            HostLib, p, g, b, F.sgd_hparams(len(p), 0.05, hv["momentum"], hv["dampening"],
            hv["weight_decay"], hv["nesterov"], True), maximize, None, 2.0, None, given, 1e-6,
            "propagate",
        )  # fmt: skip
        cb = [np.zeros_like(a) for a in cp]
        optim.sgd_step_(cp, g, cb, lr=0.05, maximize=maximize, first_step=True, clip_coef=c, **hv)
        for got, want in zip(p + b, cp + cb, strict=True):
            np.testing.assert_array_equal(got, want)
    assert HostLib.syncs == 0
