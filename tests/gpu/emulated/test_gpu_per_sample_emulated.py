"""The per-sample GPU driver's host side, run on the CPU against NumPy emulations of
its kernels (``fastclip/_gpu/per_sample_kernels.cu``).

This file owns the per-sample GPU driver's host side; shared emulation helpers are in
tests/_gpu_emulation.py.

As in ``tests/gpu/emulated/test_gpu_host_emulated.py``: "device memory" is NumPy memory,
pointers are host addresses, and each kernel is replaced by a NumPy
transcription of its CUDA source that reads and writes through the raw
addresses it is given, with the launch arguments in kernel order.  The
tunables are patched small so every array has many pass-1 chunks per row and
pass 2 splits the batch into row groups (partials + combine).  A wrong
argument order, stride or pointer offset gives wrong numbers, checked against a
float64 oracle of the DP-SGD formula.
"""

from __future__ import annotations

import contextlib
import math
from typing import ClassVar

import _gpu_emulation
import numpy as np
import pytest
import reference as ref
from _gpu_emulation import PCODES, mem, pow_sum, ps_tiny_factor, root

import fastclip
from fastclip import _config as cfg
from fastclip import _dispatch
from fastclip import _gpu as gpu
from fastclip._gpu import _adapters, _modules, _tables
from fastclip._gpu import _per_sample as gps

try:
    import ml_dtypes

    BF16: type | None = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover - ml_dtypes ships with the test extras' jax/tf deps
    BF16 = None

CTYPES = dict(_gpu_emulation.CTYPES)
if BF16 is not None:
    CTYPES["__nv_bfloat16"] = BF16
KINDS = {"float16", "float32", "float64", "bfloat16"}


#: Host memory the "device" may touch: (start, end, array kept alive).  Every access
#: through a raw address must lie inside one region, so an under-sized scratch buffer
#: or a shifted pointer fails an assertion instead of corrupting the interpreter.
REGIONS: list[tuple[int, int, np.ndarray]] = []


def _reg(*arrays):
    for a in arrays:
        base = a.ctypes.data
        REGIONS.append((base, base + a.nbytes, a))
    return arrays


def _mem(ptr, n, dtype, null_is_empty=False):
    return mem(ptr, n, dtype, null_is_empty=null_is_empty, regions=REGIONS)


def _acc(dt):
    return np.float64 if dt == np.float64 else np.float32


def _combine(s, v, ord_code):
    if ord_code != 0:
        return s + v
    if math.isnan(s) or math.isnan(v):
        return math.nan
    return max(s, v)


def _factor(norm, bound, eps):
    with np.errstate(all="ignore"):
        den = np.float64(norm) + eps
        r = np.float64(bound) / den
    return 1.0 if (r >= 1.0 or den == 0.0) else float(r)


LAUNCHES: list[tuple[str, tuple, tuple, tuple]] = []
#: per_sample_kernels.cu's FASTCLIP_PS_ROW_BLOCK: rows added in float32 per block.
ROW_BLOCK = 64


def _emulate(name, targ):
    dt = CTYPES[targ]

    def pow_partials(a):
        x, rows, cols, chunk, n_chunks, ord_code, p, mode, scale, s_offset, partials = a
        rows, cols, chunk, n_chunks = int(rows), int(cols), int(chunk), int(n_chunks)
        mode, s_offset = int(mode), int(s_offset)
        xs = _mem(x, rows * cols, dt)
        scales = _mem(scale, s_offset + rows, np.float64) if mode else None
        out = _mem(partials, rows * n_chunks, np.float64)
        for w in range(rows * n_chunks):
            b = w // n_chunks
            m = 1.0 if mode == 0 else float(scales[s_offset + b])
            if (mode == 1 and m == 0.0) or (mode == 2 and not m > 0.0):
                continue
            start = (w - b * n_chunks) * chunk
            n = min(chunk, cols - start)
            seg = xs[b * cols + start : b * cols + start + n]
            if mode == 2:
                with np.errstate(all="ignore"):
                    out[w] = float(np.sum((np.abs(seg.astype(np.float64)) / m) ** float(p)))
            else:
                out[w] = pow_sum(seg, 0 if mode == 1 else int(ord_code), float(p))

    def factors(a):
        (partials, table, n_arrays, rows, ord_code, p, eps, per_layer, stage, lo, hi) = a[:11]
        max_partials, scaled_partials, scale, norms, facs, n_clipped = a[11:]
        k_n, rows, ord_code, p, layer = (
            int(n_arrays),
            int(rows),
            int(ord_code),
            float(p),
            int(per_layer),
        )
        tab = _mem(table, 3 * k_n, np.int64)
        offsets, chunks, bounds = tab[:k_n], tab[k_n : 2 * k_n], tab[2 * k_n :].view(np.float64)
        total = int(max((o + rows * c for o, c in zip(offsets, chunks)), default=0))
        n_samples = k_n * rows if layer else rows
        scales = _mem(scale, n_samples, np.float64, null_is_empty=True)

        def sample_sum(buf, s, pc):  # ps_sample_sum
            part = _mem(buf, max(total, 1), np.float64)

            def row_sum(k, b):
                v = 0.0
                for c in range(int(chunks[k])):
                    v = _combine(v, part[int(offsets[k]) + b * int(chunks[k]) + c], pc)
                return v

            if layer:
                return row_sum(s // rows, s % rows)
            v = 0.0
            for k in range(k_n):
                v = _combine(v, row_sum(k, s), pc)
            return v

        if int(stage) == 1:
            for s in range(n_samples):
                t = sample_sum(partials, s, ord_code)
                scales[s] = 0.0 if float(lo) < t < float(hi) else -1.0
            return
        if int(stage) == 2:
            for s in range(n_samples):
                if scales[s] != 0.0:
                    m = sample_sum(max_partials, s, 0)
                    scales[s] = m if (m > 0.0 and math.isfinite(m)) else 0.0
            return
        nout = _mem(norms, n_samples, dt)
        fout = _mem(facs, n_samples, np.float64)
        count = 0
        for b in range(rows):
            hit = False
            for k in range(k_n if layer else 1):
                s = k * rows + b if layer else b
                if scales.size and scales[s] > 0.0:
                    norm = scales[s] * root(sample_sum(scaled_partials, s, 1), 3, p)
                else:
                    norm = root(sample_sum(partials, s, ord_code), ord_code, p)
                f = _factor(norm, bounds[k], float(eps))
                nout[s] = norm
                fout[s] = f
                hit = hit or f < 1.0
            count += int(hit)
        _mem(n_clipped, 1, np.float64)[0] = count

    def weighted_cols(xs, fs, b0, b1):  # ps_weighted_cols, all columns at once
        acc_t = _acc(dt)
        acc64 = np.zeros(xs.shape[1], np.float64)
        tiny = ps_tiny_factor(fs, acc_t)
        for r0 in range(b0, b1, ROW_BLOCK):
            acc = np.zeros(xs.shape[1], acc_t)  # rows of one block added in A, in order
            for b in range(r0, min(r0 + ROW_BLOCK, b1)):
                if tiny[b]:  # multiplied and added in float64
                    acc64 += xs[b].astype(np.float64) * fs[b]
                else:
                    acc += xs[b].astype(acc_t) * acc_t(fs[b])
            acc64 += acc.astype(np.float64)
        return acc64

    def weighted_sum(a):
        x, rows, cols, f, rows_per_split, n_splits, scale, out, partials = a
        rows, cols, rps, ns = int(rows), int(cols), int(rows_per_split), int(n_splits)
        xs = _mem(x, rows * cols, dt).reshape(rows, cols)
        fs = _mem(f, rows, np.float64)
        for s in range(ns):
            b0, b1 = s * rps, min(s * rps + rps, rows)
            assert b0 < b1, "an empty row group"
            acc = weighted_cols(xs, fs, b0, b1)
            if ns == 1:
                _mem(out, cols, dt)[:] = (acc * float(scale)).astype(_acc(dt)).astype(dt)
            else:
                _mem(partials, ns * cols, np.float64)[s * cols : (s + 1) * cols] = acc

    def combine(a):
        partials, n_splits, cols, scale, out = a
        ns, cols = int(n_splits), int(cols)
        parts = _mem(partials, ns * cols, np.float64).reshape(ns, cols)
        s = np.zeros(cols, np.float64)
        for k in range(ns):  # row groups added in order
            s += parts[k]
        _mem(out, cols, dt)[:] = (s * float(scale)).astype(_acc(dt)).astype(dt)

    def scale_rows(a):
        x, rows, cols, f, out = a
        rows, cols = int(rows), int(cols)
        acc_t = _acc(dt)
        xs = _mem(x, rows * cols, dt).reshape(rows, cols)
        fs = _mem(f, rows, np.float64)
        tiny = ps_tiny_factor(fs, acc_t)[:, None]
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 is NaN on a GPU too
            short = xs.astype(acc_t) * fs.astype(acc_t)[:, None]
            wide = (xs.astype(np.float64) * fs[:, None]).astype(acc_t)
            _mem(out, rows * cols, dt)[:] = np.where(tiny, wide, short).astype(dt).ravel()

    body = {
        "fastclip_ps_pow_partials": pow_partials,
        "fastclip_ps_factors": factors,
        "fastclip_ps_weighted_sum": weighted_sum,
        "fastclip_ps_combine": combine,
        "fastclip_ps_scale_rows": scale_rows,
    }[name]

    def launch(grid, block, args):
        assert 1 <= len(grid) <= 2 and all(1 <= g for g in grid)
        assert grid[0] <= cfg.GPU_MAX_BLOCKS and (len(grid) == 1 or grid[1] <= 65_535)
        assert len(block) == 1 and 1 <= block[0] <= 1_024
        assert all(isinstance(v, np.generic) for v in args), "kernel arguments are NumPy scalars"
        LAUNCHES.append((name, targ, grid, block))
        body(args)

    return launch


class HostLib(_gpu_emulation.HostLib):
    """The GPU adapter interface over NumPy memory; every buffer it makes is registered."""

    devices: ClassVar[dict[int, int]] = {}
    kind = staticmethod(lambda x: str(x.dtype) if str(x.dtype) in KINDS else None)
    device_id = staticmethod(lambda x: HostLib.devices.get(id(x), 0))

    @staticmethod
    def as_contiguous(x):
        return _reg(np.ascontiguousarray(x))[0]

    @staticmethod
    def upload(buf, like):
        return _reg(buf.copy())[0], None

    @staticmethod
    def empty(shape, kind, like):
        # garbage, not zeros: a kernel that skips an element leaves it visible
        dtype = BF16 if kind == "bfloat16" else np.dtype(kind)
        return _reg(np.full(shape, 12345.0, dtype))[0]


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    monkeypatch.setattr(
        _modules, "kernel", lambda feature, device, name, targ: _emulate(name, targ)
    )
    monkeypatch.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    monkeypatch.setattr(gps, "POW_CHUNK", 4)  # many chunks per row, ragged last chunk
    monkeypatch.setattr(gps, "PASS2_BLOCK", 4)
    monkeypatch.setattr(gps, "TARGET_BLOCKS", 64)  # row groups for the small arrays
    monkeypatch.setattr(gps, "MIN_SPLIT_ROWS", 2)
    _tables.TABLES.clear()
    LAUNCHES.clear()
    REGIONS.clear()
    HostLib.devices = {}
    HostLib.syncs = 0


# -------------------------------------------------------------------- oracle


def oracle(arrays, bounds, ord_code, p, per_layer, reduce, eps):
    """The float64 reference, ``reference.clip_per_sample``, called with (ord_code, p)."""
    ord = math.inf if ord_code == 0 else p
    return ref.clip_per_sample(arrays, bounds, ord, per_layer, reduce, eps)


def _tol(dtype):
    return {np.float16: 2e-3, np.float32: 1e-6, np.float64: 1e-12}.get(dtype, 1e-2)


def _check(arrays, bounds, ord_code, p, per_layer, reduce, eps=1e-6, rtol=None):
    HostLib.syncs = 0
    _reg(*arrays)
    outs, norms, n_clipped = gps.clip_per_sample_gpu(
        HostLib, arrays, arrays[0].shape[0], ord_code, p, np.asarray(bounds, np.float64),
        per_layer, reduce, eps,
    )  # fmt: skip
    ref_outs, ref_norms, ref_clipped = oracle(arrays, bounds, ord_code, p, per_layer, reduce, eps)
    assert n_clipped == ref_clipped and type(n_clipped) is int
    assert HostLib.syncs == 1, "exactly one device-to-host read per call"
    wide = any(a.dtype == np.float64 for a in arrays)
    assert norms.dtype == (np.float64 if wide else np.float32)
    assert norms.shape == ((len(arrays),) if per_layer else ()) + (arrays[0].shape[0],)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-6 if not wide else 1e-12)
    for a, o, r in zip(arrays, outs, ref_outs, strict=True):
        assert o.dtype == a.dtype
        assert o.shape == (a.shape if reduce is None else a.shape[1:])
        scale = np.abs(np.asarray(a, np.float64)).sum(axis=0).max(initial=0.0)
        t = rtol or _tol(a.dtype.type)
        np.testing.assert_allclose(np.asarray(o, np.float64), r, rtol=t, atol=t * scale + 1e-30)
    return outs, norms, n_clipped


DTYPES = [np.float32, np.float64, np.float16] + ([BF16] if BF16 is not None else [])


def _data(shapes, dtype, seed=0, batch=9):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((batch, *s)) * (0.2 + k)).astype(dtype) for k, s in enumerate(shapes)
    ]


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("reduce", ["sum", "mean", None])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize(("ord_code", "p"), PCODES)
def test_formula_matches_float64_oracle(ord_code, p, per_layer, reduce):
    arrays = _data([(5,), (3, 4), (0,), (37,), (1,)], np.float32)
    bounds = [1.5, 0.7, 1.0, 2.5, 0.1] if per_layer else [1.0] * 5
    _check(arrays, bounds, ord_code, p, per_layer, reduce)
    names = [launch[0] for launch in LAUNCHES]
    # not for the empty array; general p: two more per array over marked rows only,
    # and the factors kernel's three stages (mark, max, final)
    assert names.count("fastclip_ps_pow_partials") == (12 if ord_code == 3 else 4)
    assert names.count("fastclip_ps_factors") == (3 if ord_code == 3 else 1)
    if reduce is not None:
        assert names.count("fastclip_ps_weighted_sum") == 4
        assert names.count("fastclip_ps_combine") >= 1  # row groups were exercised


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduce", ["sum", None])
def test_dtypes(dtype, reduce):
    arrays = _data([(6,), (2, 8), (33,)], dtype, seed=1, batch=70)  # > one 64-row block
    _check(arrays, [1.0] * 3, 2, 2.0, False, reduce)
    _check(arrays, [0.5, 1.0, 2.0], 2, 2.0, True, reduce)


def test_mixed_dtypes_give_float64_norms_and_keep_each_dtype():
    a, b = _data([(7,), (4, 3)], np.float32, seed=2)
    arrays = [a, b.astype(np.float64), a[:, :3].astype(np.float16)]
    _check(arrays, [1.0] * 3, 2, 2.0, False, "sum", rtol=2e-3)
    assert {launch[1] for launch in LAUNCHES if launch[0] == "fastclip_ps_factors"} == {"double"}


@pytest.mark.parametrize("reduce", ["sum", None])
def test_batch_of_one_and_wide_rows(reduce):
    arrays = _data([(1_003,), (2,)], np.float32, seed=3, batch=1)
    _check(arrays, [1.0, 1.0], 2, 2.0, False, reduce)
    _check(arrays, [1.0, 1.0], 2, 2.0, True, reduce)


def test_non_contiguous_inputs_are_read_through_a_copy():
    base = np.random.default_rng(4).standard_normal((9, 8, 6)).astype(np.float32)
    arrays = [base[:, ::2, 1:], base[:, :, 0]]
    assert not arrays[0].flags.c_contiguous
    before = base.copy()
    _check(arrays, [1.0, 1.0], 2, 2.0, False, "sum")
    _check(arrays, [1.0, 1.0], 2, 2.0, False, None)
    np.testing.assert_array_equal(base, before)


def test_nan_and_zero_norm_samples():
    x = np.random.default_rng(5).standard_normal((6, 10)).astype(np.float32) * 3
    x[1] = 0.0  # zero norm: factor 1, not 0/0
    x[4, 3] = np.nan  # NaN norm: NaN factor
    _reg(x)
    outs, norms, n_clipped = gps.clip_per_sample_gpu(
        HostLib, [x], 6, 2, 2.0, np.array([1.0]), False, None, 0.0
    )
    assert np.isnan(norms[4]) and norms[1] == 0.0
    assert np.isnan(outs[0][4]).all()
    np.testing.assert_array_equal(outs[0][1], 0.0)
    assert n_clipped == 4  # NaN is not counted as clipped (NaN < 1 is false), as the CPU path
    summed, _, _ = gps.clip_per_sample_gpu(
        HostLib, [x], 6, 2, 2.0, np.array([1.0]), False, "sum", 0.0
    )
    assert np.isnan(summed[0]).all()


def test_infinite_and_zero_bounds():
    arrays = _data([(5,), (3,)], np.float64, seed=6)
    _check(arrays, [math.inf, math.inf], 2, 2.0, False, "sum")
    _check(arrays, [0.0, math.inf], 2, 2.0, True, "sum")


def test_table_upload_is_cached_between_steps():
    arrays = _data([(5,), (3,)], np.float32, seed=7)
    _check(arrays, [1.0, 1.0], 2, 2.0, False, "sum")
    _check(arrays, [1.0, 1.0], 2, 2.0, False, "sum")
    assert len(_tables.TABLES) == 1
    _check(arrays, [2.0, 1.0], 2, 2.0, True, "sum")  # other bounds: another table
    assert len(_tables.TABLES) == 2


def test_bad_arrays_raise_before_any_launch():
    a, b = _data([(5,), (3,)], np.float32)
    HostLib.devices = {id(b): 1}
    with pytest.raises(TypeError, match="one device"):
        gps.clip_per_sample_gpu(HostLib, [a, b], 9, 2, 2.0, np.ones(2), False, "sum", 1e-6)
    HostLib.devices = {}
    with pytest.raises(TypeError, match="float16, bfloat16"):
        gps.clip_per_sample_gpu(
            HostLib, [a, b.astype(np.int32)], 9, 2, 2.0, np.ones(2), False, "sum", 1e-6
        )
    assert LAUNCHES == [] and HostLib.syncs == 0


def test_public_function_routes_gpu_arrays_to_the_driver(monkeypatch):
    """clip_per_sample's GPU branch (validation, lib choice, result) with the emulated driver;
    equal to the CPU route to 1e-6."""
    arrays = list(_reg(*_data([(5,), (3, 4)], np.float32, seed=8)))
    expected = fastclip.clip_per_sample(arrays, [1.0, 0.5], per_layer=True, reduce="mean")
    backend = _dispatch.Backend(_dispatch.ROUTE_GPU, gpu, HostLib)
    monkeypatch.setattr(_dispatch, "backend_for", lambda items, **kw: backend)
    got = fastclip.clip_per_sample(arrays, [1.0, 0.5], per_layer=True, reduce="mean")
    assert type(got) is fastclip.PerSampleClipResult
    assert got.n_clipped == expected.n_clipped
    np.testing.assert_allclose(got.norms, expected.norms, rtol=1e-6)
    for g, e in zip(got.grads, expected.grads, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
    single = fastclip.clip_per_sample(arrays[0], 1.0)
    assert isinstance(single.grads, np.ndarray) and single.grads.shape == (5,)
    with pytest.raises(ValueError, match="per_layer"):
        fastclip.clip_per_sample(arrays, [1.0, 0.5])  # validated before the route


def test_plans():
    n_chunks, offsets, total = gps.plan_rows([10, 0, 4, 5], 4)
    assert n_chunks == [3, 0, 1, 2] and offsets == [0, 3, 3, 4] and total == 6
    # wide: no row groups; narrow: row groups of >= min_rows rows covering the batch
    assert gps.plan_weighted_sum(256, 1 << 20, 4, 256, 1024, 32) == (1024, 1, 256, 1)
    gx, gy, rps, ns = gps.plan_weighted_sum(1000, 4096, 4, 256, 1024, 32)
    assert gx == 4 and ns == gy and rps >= 32 and (ns - 1) * rps < 1000 <= ns * rps
    assert gps.plan_weighted_sum(1, 10, 1, 256, 1024, 32) == (1, 1, 1, 1)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("reduce", ["sum", None])
@pytest.mark.parametrize(("ord_code", "p"), [(2, 2.0), (3, 3.0)])
def test_extreme_magnitudes_are_rescaled_on_the_device(scale, per_layer, reduce, ord_code, p):
    """float64 samples of 1e200 (squares overflow) and 1e-200 (squares underflow): finite,
    correct norms and factors (the core's max-rescaling rule), still one host read.  The
    float64 oracle runs on the unscaled data: norms and p-norm clipping are homogeneous,
    so with eps=0 out(s * g, s * C) = s * out(g, C)."""
    base = _data([(5,), (3, 4), (0,), (1,)], np.float64, seed=9)
    base[0][2] = 0.0  # in per-layer mode array 0 of sample 2 has a zero norm
    base[1][2] = 0.0
    arrays = [b * scale for b in base]
    bounds = [3.0, 1.0, 2.0, 0.5] if per_layer else [3.0] * 4
    HostLib.syncs = 0
    _reg(*arrays)
    outs, norms, n_clipped = gps.clip_per_sample_gpu(
        HostLib, arrays, 9, ord_code, p, np.asarray(bounds) * scale, per_layer, reduce, 0.0
    )
    ref_outs, ref_norms, ref_clipped = oracle(base, bounds, ord_code, p, per_layer, reduce, 0.0)
    assert HostLib.syncs == 1
    assert np.isfinite(norms).all() and n_clipped == ref_clipped
    np.testing.assert_allclose(norms, ref_norms * scale, rtol=1e-12)
    for o, r in zip(outs, ref_outs, strict=True):
        np.testing.assert_allclose(o, r * scale, rtol=1e-12, atol=1e-12 * scale)


def test_rescaling_keeps_nan_inf_and_zero_samples():
    """Samples the rescaling cannot help keep their plain norm: NaN stays NaN, inf stays
    inf (factor 0), a zero sample 0 (factor 1); the 1e200 sample next to them is rescaled."""
    x = np.random.default_rng(10).standard_normal((5, 6)) * 1e200
    x[1, 2] = np.nan
    x[2, 0] = np.inf
    x[3] = 0.0
    _reg(x)
    outs, norms, n_clipped = gps.clip_per_sample_gpu(
        HostLib, [x], 5, 2, 2.0, np.array([1.0]), False, None, 0.0
    )
    assert np.isnan(norms[1]) and norms[2] == np.inf and norms[3] == 0.0
    for b in (0, 4):
        expected = 1e200 * np.linalg.norm(x[b] / 1e200)
        np.testing.assert_allclose(norms[b], expected, rtol=1e-12)
        np.testing.assert_allclose(outs[0][b], x[b] / expected, rtol=1e-12)
    np.testing.assert_array_equal(outs[0][3], 0.0)
    assert n_clipped == 3  # samples 0, 2 and 4; NaN is not counted (NaN < 1 is false)


def test_subnormal_samples_are_rescaled_by_division():
    """A float64 sample of subnormals (3e-310, 4e-310): its squares are 0, and 1 / max
    overflows to inf, so the device divides by the max instead: the norm is the float64
    reference's (np.hypot, exact for subnormals), not 0 or inf."""
    x = np.array([[3e-310, 4e-310], [3.0, 4.0]])
    _reg(x)
    outs, norms, n_clipped = gps.clip_per_sample_gpu(
        HostLib, [x], 2, 2, 2.0, np.array([1e-309]), False, None, 0.0
    )
    expected = np.hypot(x[:, 0], x[:, 1])
    np.testing.assert_allclose(norms, expected, rtol=1e-12)
    assert n_clipped == 1  # only the second sample (norm 5 > 1e-309)
    np.testing.assert_array_equal(outs[0][0], x[0])  # factor 1
    np.testing.assert_allclose(outs[0][1], x[1] * (1e-309 / 5.0), rtol=1e-12)


# ------------------------------------------- factors float32 arithmetic cannot take


def _tiny_check(arrays, bound, reduce):
    """The emulated driver (eps = 0, L2, flat) against the float64 oracle and, for
    NumPy dtypes, the CPU route: norms to float32 rounding, outputs within 1e-6 of
    the clipped rows' magnitudes (so rows clipped to 1e-25 are checked at ~1e-31, not
    at the data's scale; atol the dtype's smallest subnormal).  Returns the outputs
    and the number of clipped samples."""
    HostLib.syncs = 0
    _reg(*arrays)
    outs, norms, n = gps.clip_per_sample_gpu(
        HostLib, arrays, arrays[0].shape[0], 2, 2.0, np.asarray([bound]), False, reduce, 0.0
    )
    assert HostLib.syncs == 1
    r_outs, r_norms, r_n = ref.clip_per_sample(arrays, bound, 2, False, reduce, 0.0)
    rows = ref.clip_per_sample(arrays, bound, 2, False, None, 0.0)[0]
    div = arrays[0].shape[0] if reduce == "mean" else 1
    assert n == r_n
    np.testing.assert_allclose(norms, r_norms, rtol=1e-6)
    cpu = None
    if all(a.dtype != BF16 for a in arrays):  # (the CPU route refuses ml_dtypes' bfloat16)
        cpu = fastclip.clip_per_sample([np.array(a) for a in arrays], bound, 2, reduce=reduce,
                                       eps=0.0)  # fmt: skip
        assert cpu.n_clipped == n
    for k, (a, o, r, rw) in enumerate(zip(arrays, outs, r_outs, rows, strict=True)):
        assert o.dtype == a.dtype
        bf16 = BF16 is not None and a.dtype == BF16
        tiny = 2.0**-133 if bf16 else float(np.finfo(a.dtype).smallest_subnormal)
        t = max(_tol(a.dtype.type), 1e-6)
        mags = np.abs(rw) if reduce is None else np.abs(rw).sum(axis=0) / div
        g = np.asarray(o, np.float64)
        assert np.all(np.abs(g - r) <= t * mags + tiny), (k, g, r)
        if cpu is not None:
            assert np.all(np.abs(g - np.asarray(cpu.grads[k], np.float64)) <= t * mags + tiny)
    return outs, n


@pytest.mark.parametrize("dtype", [np.float32, np.float16] + ([BF16] if BF16 is not None else []),
                         ids=lambda d: np.dtype(d).name)  # fmt: skip
@pytest.mark.parametrize("reduce", ["sum", "mean", None])
def test_tiny_factors_are_applied_in_float64(reduce, dtype):
    """per_sample_kernels.cu's ps_tiny_factor, emulated: 16/32-bit samples clipped by
    factors below float32's range (norm 3e20 or 4e4 clipped to 1e-40 or 1e-25: f down
    to 2.5e-45, 0 as a float32 after rounding) or below 2**-60 are multiplied in
    float64, so the clipped rows and their sums are the oracle's and the CPU route's,
    not 0 (float16: the products lie below its range, and 0 is the oracle's answer
    too); the data and bounds of test_gpu_per_sample_host_compiled.py's
    test_the_cuda_source_takes_tiny_factors."""
    big = 1e20 if dtype != np.float16 else 1e4
    rng = np.random.default_rng(10)  # four samples, all clipped
    x = [(rng.standard_normal((4, *c)) * (0.3 + k) * big).astype(dtype)
         for k, c in enumerate([(9,), (2, 8)])]  # fmt: skip
    for bound in (1e-25, 1e-40, big * 1e-19):
        outs, n = _tiny_check(x, bound, reduce)
        assert n == 4
        if dtype != np.float16 and bound != 1e-40:  # (else the results round to 0)
            assert all(np.all(np.asarray(o, np.float64) != 0.0) for o in outs)


@pytest.mark.parametrize("reduce", ["sum", None])
def test_tiny_factors_beside_ordinary_ones(reduce):
    """Float32 samples of 1e20 (factor 5e-46 for a bound of 1e-25: 0 as a float32)
    and of norm ~2 (factors ~5e-26, below 2**-60: float64 rows) beside samples of
    1e-20 and 1e-23 (factors ~5e-6 and ~5e-3: float32 rows, one sum): the oracle's
    rows and sums, all six samples clipped; the 1e20 sample's clipped row is not 0.  test_gpu_per_sample_host_compiled.py's
    test_the_cuda_source_float32_squares_beyond_float32, its second case."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((6, 41)) * 0.3).astype(np.float32)
    x[1] *= np.float32(1e20)
    x[3] *= np.float32(1e-20)
    x[4] *= np.float32(1e-23)
    outs, n = _tiny_check([x], 1e-25, reduce)
    assert n == 6
    if reduce is None:
        assert np.all(outs[0][1] != 0.0) and np.abs(outs[0][1]).max() < 1e-25
