"""``global_norm(..., per_array=True)`` and ``clip_by_global_norm(_)(..., per_array=True)``.

Every route returns ``(total, per)``: ``per[i]`` is array i's norm (float64
NumPy oracle of ``reference.norm``), the total is ``reference.global_norm``,
``per`` is 1-D in the arrays' library, device and norm dtype.  Routes: the
backend matrix (NumPy, read-only NumPy, torch, array-api-strict; the GPU
members skip without a device), Dask, and the GPU driver with its kernels
emulated on host memory (``fastclip_tensor_norms`` transcribed from
``kernels.cu``; ``fastclip_finish`` and ``fastclip_scale`` with the two-factor
coefficient of tests/_gpu_emulation.py, as kernels.cu computes it).
"""

from __future__ import annotations

import contextlib
import math

import _gpu_emulation
import numpy as np
import pytest
import reference as ref
from _backends import CPU, WRITEABLE, Backend, assert_close, backend_params, params, sample
from _gpu_emulation import coefficient, coefficient_parts, mem, scaled2
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastclip
from fastclip import _config as cfg

ORDS = [2, 1, math.inf, 3, 0.5]


def _arrays(backend, dtype, sizes=(5, 0, 23, 7, 1), seed=0):
    return [backend.asarray(sample(n, seed=seed + i), dtype) for i, n in enumerate(sizes)]


def _check(backend, arrays, total, per, ord, dtype, norm_dt):
    data = [backend.to_numpy(a) for a in arrays]
    backend.assert_array(total, arrays[0], norm_dt, ())
    backend.assert_array(per, arrays[0], norm_dt, (len(arrays),))
    assert_close(backend.to_numpy(total), ref.global_norm(data, ord), dtype)
    assert_close(backend.to_numpy(per), np.array([ref.norm(d, ord) for d in data]), dtype)


@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(
    ("backend", "dtype"), params(dtypes=("float16", "bfloat16", "float32", "float64"))
)
def test_global_norm_per_array(backend, dtype, ord):
    arrays = _arrays(backend, dtype)
    total, per = fastclip.global_norm(arrays, ord, per_array=True)
    norm_dt = "float64" if dtype == "float64" else "float32"
    _check(backend, arrays, total, per, ord, dtype, norm_dt)
    assert backend.to_numpy(per)[1] == 0.0  # the zero-size array
    # the total is the one per_array=False gives
    assert_close(
        backend.to_numpy(total), backend.to_numpy(fastclip.global_norm(arrays, ord)), dtype
    )


@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize("backend", backend_params(CPU))
def test_mixed_dtypes_keep_the_callers_order(backend, ord):
    """Packing groups arrays by dtype; ``per`` is still in the caller's order."""
    dtypes = ["float32", "float64", "float32", "float64", "float32"]
    arrays = [
        backend.asarray(sample(4 + 3 * i, seed=i, scale=10.0**i), d) for i, d in enumerate(dtypes)
    ]
    total, per = fastclip.global_norm(arrays, ord, per_array=True)
    _check(backend, arrays, total, per, ord, "float32", "float64")


@pytest.mark.parametrize("ord", [2, 1, math.inf, 3], ids=str)
@pytest.mark.parametrize("count", [1, 12])
def test_many_chunks_strided_and_torch(small_chunks, ord, count):
    """Chunks of 7 elements, the bulk-header path (>= 8 arrays), a strided copy."""
    import torch

    arrays = [np.array(sample(3 + 5 * i, seed=i), np.float32) for i in range(count)]
    if count > 1:
        arrays[3] = np.array(sample((6, 8), seed=40), np.float32)[:, ::2]
    for arrs in (arrays, [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]):
        total, per = fastclip.global_norm(arrs, ord, per_array=True)
        assert_close(
            np.asarray(per, np.float64), [ref.norm(np.asarray(a), ord) for a in arrs], "float32"
        )
        assert float(total) == float(fastclip.global_norm(arrs, ord))  # bit-identical total


@pytest.mark.parametrize("ord", [2, 3, 0.5], ids=str)
def test_extreme_float64_values_are_rescaled_per_array(ord):
    """Power sums beyond float64's range: each array rescaled by its own max."""
    arrays = [
        np.full(3, 1e-200),
        np.full(4, 1e200),
        np.array([3.0, 4.0]),
        np.zeros(2),
        np.array([5e-324]),
    ]
    total, per = fastclip.global_norm(arrays, ord, per_array=True)
    np.testing.assert_allclose(per, [ref.norm(a, ord) for a in arrays], rtol=1e-12)
    np.testing.assert_allclose(total, ref.global_norm(arrays, ord), rtol=1e-12)


def test_empty_and_single():
    total, per = fastclip.global_norm([], per_array=True)
    assert float(total) == 0.0 and per.shape == (0,) and per.dtype == np.float32
    x = np.array([3.0, 4.0], np.float32)
    total, per = fastclip.global_norm([x], 2, per_array=True)
    assert per.shape == (1,) and float(per[0]) == float(total) == 5.0
    assert fastclip.clip_by_global_norm_([], 1.0, per_array=True)[1].shape == (0,)
    total, per = fastclip.clip_by_global_norm_([x], 1.0, per_array=True, eps=0.0)
    assert float(total) == 5.0 and per.tolist() == [5.0]
    np.testing.assert_allclose(x, [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize("ord", [2, 1, math.inf, 3], ids=str)
@pytest.mark.parametrize("layout", ["one-dtype", "mixed", "strided"])
@pytest.mark.parametrize("backend", backend_params(WRITEABLE))
def test_clip_by_global_norm_in_place_per_array(backend, layout, ord):
    """The fused single-table launch (one dtype), and the norm-then-scale path."""
    dtypes = {"one-dtype": ["float32"] * 4, "mixed": ["float32", "float64"] * 2}.get(
        layout, ["float32"] * 4
    )
    arrays = [backend.asarray(sample(6 + i, seed=i), d) for i, d in enumerate(dtypes)]
    if layout == "strided":
        arrays[2] = backend.asarray(sample((4, 6), seed=9), "float32")[:, ::2]
    before = [backend.to_numpy(a) for a in arrays]
    total, per = fastclip.clip_by_global_norm_(arrays, 0.5, ord, per_array=True)
    expected = ref.global_norm(before, ord)
    norm_dt = "float64" if layout == "mixed" else "float32"
    backend.assert_array(per, arrays[0], norm_dt, (4,))
    assert_close(backend.to_numpy(total), expected, "float32")
    assert_close(backend.to_numpy(per), np.array([ref.norm(b, ord) for b in before]), "float32")
    coef = ref.coefficient(expected, 0.5, 1e-6)
    for a, b in zip(arrays, before, strict=True):
        assert_close(backend.to_numpy(a), b * coef, "float32", atol=1e-7)


@pytest.mark.parametrize("backend", backend_params(CPU))
def test_clip_by_global_norm_out_of_place_per_array(backend):
    arrays = _arrays(backend, "float32", (4, 0, 9))
    before = [backend.to_numpy(a) for a in arrays]
    outs, total, per = fastclip.clip_by_global_norm(arrays, 1.0, 3, per_array=True)
    assert_close(backend.to_numpy(per), np.array([ref.norm(b, 3) for b in before]), "float32")
    assert_close(backend.to_numpy(total), ref.global_norm(before, 3), "float32")
    coef = ref.coefficient(ref.global_norm(before, 3), 1.0, 1e-6)
    for o, a, b in zip(outs, arrays, before, strict=True):
        assert_close(backend.to_numpy(o), b * coef, "float32", atol=1e-7)
        np.testing.assert_array_equal(backend.to_numpy(a), b)  # inputs untouched


def test_read_only_refused_before_any_write():
    arrays = _arrays(Backend.NUMPY_READONLY, "float32", (4, 5))
    writable = np.array(sample(3, seed=7), np.float32)
    before = writable.copy()
    with pytest.raises(ValueError, match="read-only"):
        fastclip.clip_by_global_norm_([writable, *arrays], 0.1, per_array=True)
    np.testing.assert_array_equal(writable, before)


def test_given_total_norm_is_used_and_per_is_measured():
    arrays = [np.array([3.0, 4.0]), np.array([12.0])]
    total, per = fastclip.clip_by_global_norm_(arrays, 1.0, total_norm=2.0, eps=0.0, per_array=True)
    assert float(total) == 2.0 and per.tolist() == [5.0, 12.0]
    np.testing.assert_allclose(arrays[1], [6.0])


# ------------------------------------------------------------------ property


@given(
    shapes=st.lists(
        hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=9), min_size=1, max_size=9
    ),
    ord=st.sampled_from([1, 2, math.inf, 3, 0.5, 1.5]),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_property_total_is_the_norm_of_per(shapes, ord, dtype, seed):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    total, per = fastclip.global_norm(arrays, ord, per_array=True)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(per, [ref.norm(a, ord) for a in arrays], rtol=rtol)
    np.testing.assert_allclose(total, ref.norm(np.asarray(per, np.float64), ord), rtol=rtol)


# ---------------------------------------------------------------------- Dask


@pytest.mark.parametrize("ord", [2, 1, math.inf, 3], ids=str)
def test_dask_per_array_is_lazy_and_right(ord):
    da = pytest.importorskip("dask.array", reason="dask is not installed: no Dask route to test")
    data = [sample(n, seed=i) for i, n in enumerate((10, 0, 7, 25))]
    data.append(np.full(5, 1e-200))  # the (m, s) pairs of the rescaled float64 sums
    arrays = [da.from_array(d, chunks=4) for d in data]
    total, per = fastclip.global_norm(arrays, ord, per_array=True)
    assert isinstance(per, da.Array) and per.shape == (5,) and per.dtype == np.float64
    np.testing.assert_allclose(per.compute(), [ref.norm(d, ord) for d in data], rtol=1e-12)
    np.testing.assert_allclose(total.compute(), ref.global_norm(data, ord), rtol=1e-12)
    t2, p2 = fastclip.clip_by_global_norm_(arrays, 0.5, ord, per_array=True)
    np.testing.assert_allclose(p2.compute(), per.compute(), rtol=1e-12)
    np.testing.assert_allclose(t2.compute(), ref.global_norm(data, ord), rtol=1e-12)
    coef = ref.coefficient(ref.global_norm(data, ord), 0.5, 1e-6)
    for a, d in zip(arrays, data, strict=True):
        np.testing.assert_allclose(a.compute(), d * coef, rtol=1e-12)


# ------------------------------------------------------- GPU, kernels emulated


def _emulated_kernel(name, targ):
    dt = {"float": np.float32, "double": np.float64, "__half": np.float16}.get(targ)

    def table(ptrs, sizes, ct, cs, nc):
        ct_a, cs_a = mem(ct, nc, np.int64), mem(cs, nc, np.int64)
        n_t = int(ct_a.max()) + 1 if nc else 0
        return mem(ptrs, n_t, np.uint64), mem(sizes, n_t, np.int64), ct_a, cs_a

    def partial(grid, block, a):
        ptrs, sizes, ct, cs, nc, chunk, ord_code, p, out = a
        ptr_a, size_a, ct_a, cs_a = table(ptrs, sizes, ct, cs, int(nc))
        o = mem(out, int(nc), np.float64)
        for c in range(int(nc)):
            t, s = int(ct_a[c]), int(cs_a[c])
            x = mem(ptr_a[t], size_a[t], dt)[s : min(s + int(chunk), int(size_a[t]))]
            o[c] = _pow_sum(x, int(ord_code), float(p))

    def finish(grid, block, a):  # kernels.cu: fastclip_finish
        partials, n, ord_code, p, max_norm, eps, mode, given, norm_out, coef_out = a
        total = _combine(mem(partials, int(n), np.float64), int(ord_code))
        norm = mem(given, 1, np.float64)[0] if int(given) else _root(total, int(ord_code), float(p))
        mem(norm_out, 1, dt)[0] = norm
        if int(mode) >= 3:  # the two factors (c, c2) fastclip_scale reads
            parts = coefficient_parts(norm, float(max_norm), float(eps), int(mode) - 2)
            mem(coef_out, 2, np.float64)[:] = parts
        else:
            mem(coef_out, 1, np.float64)[0] = coefficient(norm, float(max_norm), float(eps), mode)

    def tensor_norms(grid, block, a):  # kernels.cu: fastclip_tensor_norms
        partials, ct, nc, nt, pos, ord_code, p, out = a
        parts, ct_a = mem(partials, int(nc), np.float64), mem(ct, int(nc), np.int64)
        pos_a = mem(pos, int(nt), np.int64, null_is_empty=True)
        for t in range(int(nt)):
            v = _combine(parts[ct_a == t], int(ord_code))
            dst = int(pos_a[t]) if pos_a.size else t
            mem(out, dst + 1, dt)[dst] = _root(v, int(ord_code), float(p))

    def scale(grid, block, a):  # kernels.cu: fastclip_scale, (x * coef[0]) * coef[1]
        src, dst, sizes, ct, cs, nc, chunk, coef = a
        src_a, size_a, ct_a, cs_a = table(src, sizes, ct, cs, int(nc))
        dst_a = mem(dst, len(src_a), np.uint64)
        c, c2 = mem(coef, 2, np.float64)
        for k in range(int(nc)):
            t, s = int(ct_a[k]), int(cs_a[k])
            e = min(s + int(chunk), int(size_a[t]))
            x = mem(src_a[t], size_a[t], dt)[s:e]
            mem(dst_a[t], size_a[t], dt)[s:e] = scaled2(x, c, c2)

    return {
        "fastclip_partial_pow_sum": partial,
        "fastclip_finish": finish,
        "fastclip_tensor_norms": tensor_norms,
        "fastclip_scale": scale,
    }[name]


def _pow_sum(v, ord_code, p):
    a = np.abs(v.astype(np.float64))
    if ord_code == 0:
        return np.nan if np.isnan(a).any() else (a.max() if a.size else 0.0)
    return float(np.sum(a**2 if ord_code == 2 else (a if ord_code == 1 else a**p)))


def _combine(vals, ord_code):
    vals = np.asarray(vals, np.float64)
    if ord_code == 0:
        return np.nan if np.isnan(vals).any() else (vals.max() if vals.size else 0.0)
    return float(vals.sum())


def _root(v, ord_code, p):
    return v if ord_code in (0, 1) else (math.sqrt(v) if ord_code == 2 else v ** (1 / p))


class HostLib(_gpu_emulation.HostLib):
    kind = staticmethod(
        lambda x: str(x.dtype) if str(x.dtype) in ("float16", "float32", "float64") else None
    )


@pytest.fixture
def emulated_gpu(monkeypatch):
    from fastclip._gpu import _adapters, _modules, _tables

    monkeypatch.setattr(
        _modules, "kernel", lambda feature, device, name, targ: _emulated_kernel(name, targ)
    )
    monkeypatch.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    monkeypatch.setattr(cfg, "GPU_CHUNK", 7)  # several chunks per array
    _tables.TABLES.clear()
    from fastclip import _gpu

    return _gpu


PCODES = [(2, 2.0), (1, 1.0), (0, math.inf), (3, 3.0)]


@pytest.mark.parametrize(("ord_code", "p"), PCODES)
@pytest.mark.parametrize("mixed", [False, True])
def test_gpu_route_per_array_emulated(emulated_gpu, ord_code, p, mixed):
    gpu = emulated_gpu
    rng = np.random.default_rng(0)
    dtypes = (
        [np.float32, np.float64, np.float32, np.float64, np.float32] if mixed else [np.float32] * 5
    )
    arrays = [rng.standard_normal(n).astype(d) for n, d in zip((5, 0, 23, 7, 16), dtypes)]
    expected = [ref.norm(a, p) for a in arrays]
    total, per = gpu.global_norm(HostLib, arrays, ord_code, p, True)
    assert per.dtype == (np.float64 if mixed else np.float32) and per.shape == (5,)
    np.testing.assert_allclose(per, expected, rtol=1e-6)
    np.testing.assert_allclose(float(total), ref.global_norm(arrays, p), rtol=1e-6)
    work = [a.copy() for a in arrays]
    outs, total2, per2 = gpu.clip_global(
        HostLib, work, 0.5, ord_code, p, 1e-6, None, False, True, True
    )
    assert outs is work
    np.testing.assert_allclose(float(total2), ref.global_norm(arrays, p), rtol=1e-6)
    np.testing.assert_allclose(per2, expected, rtol=1e-6)
    coef = ref.coefficient(ref.global_norm(arrays, p), 0.5, 1e-6)
    for w, a in zip(work, arrays, strict=True):
        np.testing.assert_allclose(w, a * coef, rtol=1e-6, atol=1e-7)


def test_gpu_route_nonfinite_indices_emulated(emulated_gpu):
    gpu = emulated_gpu
    arrays = [np.ones(3), np.array([1.0, np.nan]), np.ones(9, np.float32), np.array([np.inf])]
    before = [a.copy() for a in arrays]
    with pytest.raises(fastclip.NonFiniteNormError, match="arrays 1 and 3") as info:
        gpu.clip_global(HostLib, arrays, 1.0, 2, 2.0, 1e-6, None, True, True)
    assert info.value.indices == (1, 3) and info.value.names is None
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("ord_code", "p"), [(1, 1.0), (0, math.inf)])
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_route_per_array_two_factor_coefficient_emulated(emulated_gpu, ord_code, p, inplace):
    """float64 arrays of norm ~1e300 clipped to 1e-300 with per_array: the coefficient
    ~1e-600 is the two factors (c, c2) of kernels.cu's fastclip_finish (mode 3) and
    fastclip_scale's (x * c) * c2, not 0: the CPU route's bits (its norms agree for
    ord 1 and inf), within 1e-13 of the exact rationals, and the per-array norms."""
    gpu = emulated_gpu
    arrays = [np.array([1e300, -2e300, 3e299]), np.array([5e299, -1e299]), np.zeros(0)]
    work = [a.copy() for a in arrays]
    outs, total, per = gpu.clip_global(
        HostLib, work, 1e-300, ord_code, p, 0.0, None, False, inplace, True
    )
    assert (outs is work) == inplace
    t = float(ref.global_norm(arrays, p))
    assert float(total) == pytest.approx(t, rel=1e-15)
    np.testing.assert_allclose(per, [ref.norm(a, p) for a in arrays], rtol=1e-15)
    cpu, cpu_total, cpu_per = fastclip.clip_by_global_norm(
        [a.copy() for a in arrays], 1e-300, ord=p, eps=0.0, per_array=True
    )
    assert float(cpu_total) == float(total)
    np.testing.assert_array_equal(np.asarray(cpu_per), per)
    for o, a, c in zip(outs, arrays, cpu, strict=True):
        np.testing.assert_array_equal(o, np.asarray(c))
        np.testing.assert_array_equal(
            o, _gpu_emulation.two_factor_reference(a, total, 1e-300, None)
        )
        np.testing.assert_allclose(o, _gpu_emulation.exact_scaled(a, 1e-300, t), rtol=1e-13)
        assert np.all((o != 0) == (a != 0))
