"""The GPU driver's host side, run on the CPU against Python emulations of its kernels.

This file owns the core GPU driver's host side (tables, launches, syncs); shared
emulation helpers are in tests/_gpu_emulation.py.

No GPU here, so the CUDA kernels cannot run; but everything the driver does
around them can: grouping, table packing and upload, pointer offsets into the
table, launch arguments in kernel order, scratch buffers, copy-in/copy-out,
axis layouts.  "Device memory" is NumPy memory, pointers are host addresses,
and each kernel is replaced by a NumPy transcription of its CUDA source that
reads and writes through those raw addresses.  A wrong argument order or
offset gives wrong numbers here, checked against float64 references.
"""

from __future__ import annotations

import contextlib
import math

import _gpu_emulation
import numpy as np
import pytest
from _gpu_emulation import (
    CTYPES,
    PCODES,
    coefficient,
    coefficient_parts,
    mem,
    pow_sum,
    root,
    scaled2,
)

from fastclip import _config as cfg
from fastclip import _gpu as gpu
from fastclip._gpu import _adapters, _modules, _tables

_mem = mem


def _combine(vals, ord_code):
    vals = np.asarray(vals, np.float64)
    if ord_code == 0:
        return np.nan if np.isnan(vals).any() else (vals.max() if vals.size else 0.0)
    return float(vals.sum())


def _table(ptrs, sizes, ct, cs, nc):
    # the number of tensors is implied by the chunk table (trailing empty ones have no chunks)
    ct_a = _mem(ct, nc, np.int64)
    cs_a = _mem(cs, nc, np.int64)
    n_t = int(ct_a.max()) + 1 if nc else 0
    return _mem(ptrs, n_t, np.uint64), _mem(sizes, n_t, np.int64), ct_a, cs_a


def _emulate(name, targ):
    dt = CTYPES.get(targ)

    def partial(grid, block, a):
        ptrs, sizes, ct, cs, nc, chunk, ord_code, p, partials = a
        ptr_a, size_a, ct_a, cs_a = _table(ptrs, sizes, ct, cs, int(nc))
        out = _mem(partials, int(nc), np.float64)
        for c in range(int(nc)):
            t, s = int(ct_a[c]), int(cs_a[c])
            e = min(s + int(chunk), int(size_a[t]))
            out[c] = pow_sum(_mem(ptr_a[t], size_a[t], dt)[s:e], int(ord_code), float(p))

    def finish(grid, block, a):
        partials, n, ord_code, p, max_norm, eps, mode, given, norm_out, coef_out = a
        total = _combine(_mem(partials, int(n), np.float64), int(ord_code))
        norm = _mem(given, 1, np.float64)[0] if int(given) else root(total, int(ord_code), float(p))
        _mem(norm_out, 1, dt)[0] = norm
        if int(mode) >= 3:  # the two factors (c, c2)
            parts = coefficient_parts(norm, float(max_norm), float(eps), int(mode) - 2)
            _mem(coef_out, 2, np.float64)[:] = parts
        else:
            _mem(coef_out, 1, np.float64)[0] = coefficient(norm, float(max_norm), float(eps), mode)

    def scale(grid, block, a):
        src, dst, sizes, ct, cs, nc, chunk, coef = a
        src_a, size_a, ct_a, cs_a = _table(src, sizes, ct, cs, int(nc))
        dst_a = _mem(dst, len(src_a), np.uint64)
        c, c2 = _mem(coef, 2, np.float64)
        for k in range(int(nc)):
            t, s = int(ct_a[k]), int(cs_a[k])
            e = min(s + int(chunk), int(size_a[t]))
            x = _mem(src_a[t], size_a[t], dt)[s:e]
            _mem(dst_a[t], size_a[t], dt)[s:e] = scaled2(x, c, c2)

    def clamp(grid, block, a):
        src, dst, sizes, ct, cs, nc, chunk, lo, hi = a
        src_a, size_a, ct_a, cs_a = _table(src, sizes, ct, cs, int(nc))
        dst_a = _mem(dst, len(src_a), np.uint64)
        for k in range(int(nc)):
            t, s = int(ct_a[k]), int(cs_a[k])
            e = min(s + int(chunk), int(size_a[t]))
            x = _mem(src_a[t], size_a[t], dt)[s:e].astype(np.float64)
            x = np.where(x < float(lo), float(lo), x)
            x = np.where(x > float(hi), float(hi), x)
            _mem(dst_a[t], size_a[t], dt)[s:e] = x.astype(dt)

    def rows(grid, block, a):
        x, m, k, ord_code, p, out = a
        xs = _mem(x, int(m) * int(k), dt).reshape(int(m), int(k))
        o = _mem(out, int(m), np.float64)
        for r in range(int(m)):
            o[r] = pow_sum(xs[r], int(ord_code), float(p))

    def cols(grid, block, a):
        x, k, m, ord_code, p, out = a
        xs = _mem(x, int(k) * int(m), dt).reshape(int(k), int(m))
        o = _mem(out, int(m), np.float64)
        for j in range(int(m)):
            o[j] = pow_sum(xs[:, j], int(ord_code), float(p))

    def coefs(grid, block, a):
        pow_sums, n, ord_code, p, max_norm, eps, mode, norms, co = a
        ps = _mem(pow_sums, int(n), np.float64)
        nv = np.array([root(v, int(ord_code), float(p)) for v in ps], np.float64)
        _mem(norms, int(n), dt)[:] = nv
        if int(mode) >= 3:  # c for every slice, then c2 for every slice
            c, c2 = coefficient_parts(nv, float(max_norm), float(eps), int(mode) - 2)
            _mem(co, 2 * int(n), np.float64)[:] = np.concatenate([c, c2])
        elif int(co):
            _mem(co, int(n), np.float64)[:] = coefficient(nv, float(max_norm), float(eps), mode)

    def axis_scale(grid, block, a):
        src, dst, n, inner, outer, co = a
        j = (np.arange(int(n)) // int(inner)) % int(outer)
        both = _mem(co, 2 * int(outer), np.float64)
        c, c2 = both[: int(outer)][j], both[int(outer) :][j]
        _mem(dst, int(n), dt)[:] = scaled2(_mem(src, int(n), dt), c, c2)

    def tensor_norms(grid, block, a):  # the non-finite diagnosis reads these
        partials, ct, nc, nt, pos, ord_code, p, out = a
        parts, ct_a = _mem(partials, int(nc), np.float64), _mem(ct, int(nc), np.int64)
        pos_a = _mem(pos, int(nt), np.int64, null_is_empty=True)
        for t in range(int(nt)):
            dst = int(pos_a[t]) if pos_a.size else t
            v = root(_combine(parts[ct_a == t], int(ord_code)), int(ord_code), float(p))
            _mem(out, dst + 1, dt)[dst] = v

    return {
        "fastclip_tensor_norms": tensor_norms,
        "fastclip_partial_pow_sum": partial,
        "fastclip_finish": finish,
        "fastclip_scale": scale,
        "fastclip_clamp": clamp,
        "fastclip_rows_pow_sum": rows,
        "fastclip_cols_pow_sum": cols,
        "fastclip_axis_coefs": coefs,
        "fastclip_axis_scale": axis_scale,
    }[name]


class HostLib(_gpu_emulation.HostLib):
    """The GPU adapter interface over NumPy memory (pointers = host addresses)."""

    kind = staticmethod(lambda x: str(x.dtype) if str(x.dtype) in CTYPES_BY_KIND else None)

    @staticmethod
    def clip_integers(x, out, lo, hi):
        np.clip(x, lo, hi, out=out)


CTYPES_BY_KIND = {"float16", "float32", "float64"}


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    monkeypatch.setattr(
        _modules, "kernel", lambda feature, device, name, targ: _emulate(name, targ)
    )
    monkeypatch.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    monkeypatch.setattr(cfg, "GPU_CHUNK", 7)  # many chunks per array
    _tables.TABLES.clear()


def _ref_norm(arrays, p):
    flat = np.concatenate([np.abs(a.astype(np.float64)).ravel() for a in arrays])
    if p == math.inf:
        return flat.max() if flat.size else 0.0
    return (flat**p).sum() ** (1 / p)


@pytest.mark.parametrize(("ord_code", "p"), PCODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_norm_and_clip(ord_code, p, dtype):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(dtype) for n in (5, 0, 23, 7, 1)]
    expected = _ref_norm(arrays, p)
    got = gpu.global_norm(HostLib, arrays, ord_code, p)
    assert got.dtype == (np.float64 if dtype == np.float64 else np.float32)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)

    work = [a.copy() for a in arrays]
    _, total = gpu.clip_global(HostLib, work, 1.0, ord_code, p, 1e-6, None, False, True)
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    coef = min(1.0, 1.0 / (expected + 1e-6))
    for w, a in zip(work, arrays, strict=True):
        np.testing.assert_allclose(w, a * coef, rtol=1e-6, atol=1e-7)

    outs, total = gpu.clip_global(HostLib, arrays, 0.5, ord_code, p, 0.0, 2.0, False, False)
    np.testing.assert_allclose(float(total), 2.0)  # the given total norm is used
    for o, a in zip(outs, arrays, strict=True):
        np.testing.assert_allclose(o, a * 0.25, rtol=1e-6)


def test_mixed_dtypes_and_non_contiguous_in_place():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((6, 8))
    base_before = base.copy()
    arrays = [base[:, ::2], rng.standard_normal(9).astype(np.float32), rng.standard_normal(4)]
    expected = _ref_norm(arrays, 2.0)
    before = [a.copy() for a in arrays]
    _, total = gpu.clip_global(HostLib, arrays, 1.0, 2, 2.0, 0.0, None, False, True)
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_allclose(a, b / expected, rtol=1e-6)
    # the strided view was clipped through a contiguous copy; its neighbours are untouched
    np.testing.assert_array_equal(base[:, 1::2], base_before[:, 1::2])
    assert arrays[1].dtype == np.float32


def test_overlapping_in_place_arrays_raise_before_any_launch():
    a = np.ones(10)
    with pytest.raises(ValueError, match="share memory"):
        gpu.clip_global(HostLib, [a[:6], a[4:]], 1.0, 2, 2.0, 0.0, None, False, True)
    np.testing.assert_array_equal(a, np.ones(10))


def test_stride_0_in_place_targets_raise_before_any_launch():
    """Expanded views (stride 0) cannot be written in place on the GPU route either."""
    base = np.arange(1.0, 4.0)
    other = np.ones(5)
    x = np.lib.stride_tricks.as_strided(base, (4, 3), (0, 8))
    calls = [
        lambda: gpu.clip_global(HostLib, [other, x], 1.0, 2, 2.0, 0.0, None, False, True),
        lambda: gpu.scale_(HostLib, [other, x], 0.5),
        lambda: gpu.clamp_many_(HostLib, [other, x], -0.1, 0.1),
        lambda: gpu.rescale(HostLib, x, 2, 2.0, None, 1.0, 0.0, "clip", True),
        lambda: gpu.rescale(HostLib, x, 2, 2.0, (1,), 1.0, 0.0, "clip", True),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="share memory"):
            call()
        np.testing.assert_array_equal(base, [1.0, 2.0, 3.0])
        np.testing.assert_array_equal(other, np.ones(5))


def test_error_if_nonfinite_modifies_nothing():
    arrays = [np.array([1.0, np.nan]), np.array([2.0])]
    with pytest.raises(RuntimeError, match="non-finite"):
        gpu.clip_global(HostLib, arrays, 1.0, 2, 2.0, 0.0, None, True, True)
    np.testing.assert_array_equal(arrays[1], [2.0])


@pytest.mark.parametrize(
    ("shape", "axes"),
    [((4, 6), (1,)), ((4, 6), (0,)), ((3, 4, 5), (1, 2)), ((3, 4, 5), (0, 1)), ((3, 4, 5), (1,))],
)
@pytest.mark.parametrize(("ord_code", "p"), PCODES)
def test_axis_norms_and_clipping(shape, axes, ord_code, p):
    x = np.random.default_rng(2).standard_normal(shape)
    a = np.abs(x)
    ref = a.max(axis=axes) if p == math.inf else (a**p).sum(axis=axes) ** (1 / p)
    np.testing.assert_allclose(gpu.norm(HostLib, x, ord_code, p, axes, False), ref, rtol=1e-6)
    keep = gpu.norm(HostLib, x, ord_code, p, axes, True)
    assert keep.shape == tuple(1 if i in axes else s for i, s in enumerate(shape))
    coef = np.minimum(1.0, 1.0 / (np.expand_dims(ref, axes) + 1e-6))
    out, norms = gpu.rescale(HostLib, x, ord_code, p, axes, 1.0, 1e-6, "clip", False)
    np.testing.assert_allclose(out, x * coef, rtol=1e-6)
    np.testing.assert_allclose(norms, ref, rtol=1e-6)
    work = x.copy()
    gpu.rescale(HostLib, work, ord_code, p, axes, 1.0, 1e-6, "clip", True)
    np.testing.assert_allclose(work, x * coef, rtol=1e-6)


def test_whole_array_normalize_and_value_clipping():
    x = np.array([3.0, -4.0, 0.5])
    out, norm = gpu.rescale(HostLib, x, 2, 2.0, None, 0.0, 0.0, "normalize", False)
    np.testing.assert_allclose(out, x / np.linalg.norm(x))
    np.testing.assert_allclose(float(norm), np.linalg.norm(x))
    y = gpu.clip_by_value(HostLib, x, -1.0, 1.0, False)
    np.testing.assert_array_equal(y, [1.0, -1.0, 0.5])
    np.testing.assert_array_equal(x, [3.0, -4.0, 0.5])
    arrays = [x.copy(), np.array([np.nan, 7.0])]
    gpu.clamp_many_(HostLib, arrays, None, 2.0)
    np.testing.assert_array_equal(arrays[0], [2.0, -4.0, 0.5])
    np.testing.assert_array_equal(arrays[1], [np.nan, 2.0])
    gpu.scale_(HostLib, arrays, np.asarray(0.5))
    np.testing.assert_array_equal(arrays[0], [1.0, -2.0, 0.25])


def test_table_upload_is_cached():
    arrays = [np.ones(5), np.ones(3)]
    gpu.global_norm(HostLib, arrays, 2, 2.0)
    n_tables = len(_tables.TABLES)
    gpu.global_norm(HostLib, arrays, 2, 2.0)
    assert len(_tables.TABLES) == n_tables == 1


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize(("mode", "max_norm"), [("clip", 1.0), ("normalize", 0.0)])
def test_out_of_place_axis_copy_in_never_writes_the_input(readonly, mode, max_norm):
    """A permuted view that is already contiguous (size-1 axes) is the input's own
    memory; the out-of-place per-slice route must scale a fresh buffer instead."""
    x = np.full((2, 1, 3), 5.0)
    x.flags.writeable = not readonly
    before = x.copy()
    out, norms = gpu.rescale(HostLib, x, 2, 2.0, (1,), max_norm, 1e-6, mode, False)
    n = np.abs(before)  # the norm over a size-1 axis is |x|
    coef = 1.0 / (n + 1e-6) if mode == "normalize" else np.minimum(1.0, 1.0 / (n + 1e-6))
    np.testing.assert_allclose(out, before * coef, rtol=1e-12)
    np.testing.assert_allclose(norms, n[:, 0, :], rtol=1e-12)
    np.testing.assert_array_equal(x, before)
    base = np.arange(1.0, 25.0).reshape(2, 4, 3)
    base_before = base.copy()
    view = base.transpose(0, 2, 1)
    out, _ = gpu.rescale(HostLib, view, 2, 2.0, (0, 1), 1.0, 0.0, "clip", False)
    ref_norm = np.sqrt((base_before.transpose(0, 2, 1) ** 2).sum(axis=(0, 1), keepdims=True))
    np.testing.assert_allclose(out, base_before.transpose(0, 2, 1) / ref_norm, rtol=1e-12)
    np.testing.assert_array_equal(base, base_before)


@pytest.mark.parametrize("axes", [None, (1,)])
def test_tiny_coefficient_is_applied_in_float64(axes):
    """1e30 clipped to 1e-30: the factor 1e-60 underflows float32, the product does not."""
    x = np.array([[1e30], [2e30]], np.float32)
    out, _ = gpu.rescale(HostLib, x, 2, 2.0, axes, 1e-30, 0.0, "clip", False)
    x64 = x.astype(np.float64)
    n = np.sqrt((x64**2).sum(axis=axes, keepdims=axes is not None))
    np.testing.assert_allclose(out, (x64 * (1e-30 / n)).astype(np.float32), rtol=1e-6)
    assert np.all(out != 0)


@pytest.mark.parametrize(
    ("lo", "hi"), [(-math.inf, math.inf), (math.inf, None), (None, -math.inf), (-1e30, 2.5)]
)
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int64])
def test_integer_clip_by_value_saturates_infinite_bounds(lo, hi, dtype):
    info = np.iinfo(dtype)
    x = np.array([info.min, 0, 1, 3, info.max], dtype)
    v = [int(e) for e in x]  # the oracle on Python ints: -inf/inf below/above = no bound
    if lo is not None and lo != -math.inf:
        v = [int(info.max) if lo == math.inf else max(e, math.ceil(lo)) for e in v]
    if hi is not None and hi != math.inf:
        v = [int(info.min) if hi == -math.inf else min(e, math.floor(hi)) for e in v]
    v = [min(max(e, int(info.min)), int(info.max)) for e in v]
    out = gpu.clip_by_value(HostLib, x, lo, hi, False)
    np.testing.assert_array_equal(out, np.array(v, dtype))


@pytest.mark.parametrize("ord", list(_gpu_emulation.ORD_CODES))
def test_coefficients_beyond_float64_range_are_two_factors(ord):
    """float64 [1e300] clipped to 1e-300 (eps 0) is not 0, subnormal data normalised
    are not NaN/inf: the kernels' (c, c2) of coefficient_parts, as the CPU route."""
    _gpu_emulation.check_two_factor_cases(gpu, HostLib, ord)


def test_two_factor_edge_values():
    """The kernels' coefficient_parts transcription against the CPU route's own."""
    from fastclip import _formulas

    norms = np.array([1e300, 2.0, 0.0, np.nan, np.inf, 1e-310, 5e-324, 1e-300, 0.5])
    for mode, name, c in ((1, "clip", 1e-300), (2, "normalize", 1.0), (1, "clip", 0.0)):
        for eps in (0.0, 1e-6):
            got = coefficient_parts(norms, c, eps, mode)
            want = _formulas.coefficient_parts(norms, c, eps, name)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)
    # the one-factor modes (fused steps) are unchanged: the clamped quotient
    np.testing.assert_array_equal(
        coefficient(norms, 1e-300, 0.0, 1), _formulas.clip_coefficients(norms, 1e-300, 0.0, "clip")
    )


def test_scale_with_a_given_factor_multiplies_once():
    """scale_ passes (factor, 1): one product, as before the two-factor rule."""
    x = np.array([3.0, -1e300, 5e-324, 7.0])
    want = x * 1e-300
    gpu.scale_(HostLib, [x], 1e-300)
    np.testing.assert_array_equal(x, want)
    y = np.array([1.5, 2.5], np.float32)
    gpu.scale_(HostLib, [y], np.asarray(3.0))
    np.testing.assert_array_equal(y, np.array([4.5, 7.5], np.float32))


def test_two_factors_of_float32_data():
    """float32 data clipped below 2**-1000 times its norm: 0 after the c2 pass, as the
    CPU route (the exact product is below float32's smallest subnormal); float32
    subnormals normalised: finite, the CPU route's.  The numbers of
    test_gpu_coef_host_compiled.py's test_the_cuda_source_two_factors_of_float32_data."""
    import fastclip

    x = np.array([1e30, -2e30, 4e29], np.float32)
    out, _ = gpu.rescale(HostLib, x, 1, 1.0, None, 1e-300, 0.0, "clip", False)
    np.testing.assert_array_equal(out, np.asarray(fastclip.clip_by_norm(x, 1e-300, ord=1, eps=0.0)))
    np.testing.assert_array_equal(out, np.zeros(3, np.float32))
    s = np.array([0.0, 1e-40, -3e-40], np.float32)  # float32 subnormals, normalised
    out, _ = gpu.rescale(HostLib, s, 0, math.inf, None, 1.0, 0.0, "normalize", False)
    np.testing.assert_array_equal(out, np.asarray(fastclip.normalize(s, ord=math.inf, eps=0.0)))
    assert np.all(np.isfinite(out)) and out[2] == -1.0
