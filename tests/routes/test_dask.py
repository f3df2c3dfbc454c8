"""The Dask route: lazy norms and clipping chunk by chunk, against float64 NumPy.

This file owns what is Dask's own (chunkings, laziness, graphs, the distributed
scheduler, graph-time refusals); the operations' values on the other backends are in
tests/api/.

Covers several chunkings (uneven, single chunk, axis clipping across chunk
boundaries along every axis, 3-D with tuple axes), ord 1/2/inf/3, float16/32/64,
laziness (no kernel runs and no scheduler call before ``.compute()``), the
in-place semantics (rebinding, as dask's ``x[...] = v``), a
``distributed.LocalCluster`` run on loopback, a lazily generated array far
larger than the memory the computation may use, and bad input.
"""

from __future__ import annotations

import math
import time
import tracemalloc

import numpy as np
import pytest

da = pytest.importorskip(
    "dask.array", reason="dask is not installed (pip install 'dask[array]', the 'dask' extra)"
)
import dask  # noqa: E402
import reference as ref  # noqa: E402
from _backends import (  # noqa: E402
    ORDS,
    SATURATING_INT_BOUNDS,
    UNSUPPORTED_DTYPES,
    assert_close,
    norm_dtype,
    sample,
    unchanged,
)

import fastclip  # noqa: E402
from fastclip import _cpu, _dispatch  # noqa: E402
from fastclip._cpu import _axes, _core, _pack  # noqa: E402

DTYPES = ["float32", "float64"]

# 2-D chunkings of a (13, 17) array: single chunk, uneven along both axes, one-wide.
CHUNKS_2D = {
    "single": ((13,), (17,)),
    "uneven": ((5, 1, 7), (3, 9, 5)),
    "rows": ((1,) * 13, (17,)),
    "cols": ((13,), (4, 4, 4, 4, 1)),
}
CHUNKS_3D = ((2, 3), (4, 1, 2), (3, 3, 2))  # shape (5, 7, 8)


def _dask(x: np.ndarray, chunks) -> da.Array:
    return da.from_array(x, chunks=chunks)


def _data(shape, dtype: str, seed: int = 0) -> np.ndarray:
    return sample(shape, seed).astype(dtype)


# ----------------------------------------------------------------- norms


@pytest.mark.parametrize("chunks", list(CHUNKS_2D), ids=list(CHUNKS_2D))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("axis", [None, 0, 1, (0, 1)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_norm_matches_numpy(chunks, dtype, ord, axis, keepdims):
    x = _data((13, 17), dtype)
    got = fastclip.norm(_dask(x, CHUNKS_2D[chunks]), ord, axis=axis, keepdims=keepdims)
    assert isinstance(got, da.Array)
    value = got.compute()
    assert value.dtype == np.dtype(norm_dtype(dtype))
    assert_close(value, ref.norm(x, ord, axis=axis, keepdims=keepdims), dtype)


@pytest.mark.parametrize("axis", [(0, 2), (1, 2), (0, 1), 1, (2, 0, 1)])
@pytest.mark.parametrize("ord", ORDS)
def test_norm_3d_tuple_axes(axis, ord):
    x = _data((5, 7, 8), "float64", seed=1)
    got = fastclip.norm(_dask(x, CHUNKS_3D), ord, axis=axis).compute()
    assert_close(got, ref.norm(x, ord, axis=tuple(np.atleast_1d(axis))), "float64")


def test_float16_and_complex_norms_follow_the_core_dtypes():
    x16 = _data((40, 3), "float16")
    got = fastclip.norm(_dask(x16, (7, 2)), axis=0).compute()
    assert got.dtype == np.float32
    assert_close(got, ref.norm(x16, axis=0), "float16")
    z = (sample((30,), 2) + 1j * sample((30,), 3)).astype(np.complex128)
    got = fastclip.norm(_dask(z, 7), 3).compute()
    assert got.dtype == np.float64
    assert_close(got, ref.norm(z, 3), "complex128")


@pytest.mark.parametrize("ord", ORDS)
def test_nan_and_inf_propagate_across_chunks(ord):
    x = sample((50,), 4)
    x[33] = np.inf
    assert fastclip.norm(_dask(x, 7), ord).compute() == np.inf
    x[11] = np.nan
    assert np.isnan(fastclip.norm(_dask(x, 7), ord).compute())
    assert np.isnan(fastclip.global_norm([_dask(x, 7), da.ones(3)], ord).compute())


@pytest.mark.parametrize("chunks", ["single", "uneven", "rows"])
@pytest.mark.parametrize("exponent", [-1000, -700, 700, 1000])
@pytest.mark.parametrize("ord", [2, 3.5])
def test_extreme_float64_norms_are_rescaled_like_numpy(chunks, exponent, ord):
    """|x| ~ 2**+-1000: plain float64 power sums under/overflow; the (m, s) pairs do not.

    Oracle: the float64 norm of moderate data times an exact power of two."""
    y = sample((13, 17), 5)
    y[2:6] *= 1e-3  # mixed magnitudes inside and across chunks
    y[:, 0] = 0.0  # an all-zero column (an all-zero chunk with "cols"-like chunkings)
    scale = 2.0**exponent
    x = y * scale
    d = _dask(x, CHUNKS_2D[chunks])
    for axis in (None, 0, 1):
        expected = ref.norm(y, ord, axis=axis) * scale
        got = fastclip.norm(d, ord, axis=axis).compute()
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)
        np.testing.assert_allclose(got, fastclip.norm(x, ord, axis=axis), rtol=1e-13, atol=0)
    total = fastclip.global_norm([d, d[:4]], ord).compute()
    np.testing.assert_allclose(total, ref.global_norm([y, y[:4]], ord) * scale, rtol=1e-13)
    c = 0.5 * float(expected.max())  # eps=0: the default 1e-6 would dwarf norms ~1e-300
    clipped = fastclip.clip_by_norm(d, c, ord, axis=1, eps=0.0)
    want = ref.clip_by_norm(y, c / scale, ord, axis=1, eps=0.0) * scale
    np.testing.assert_allclose(clipped.compute(), want, rtol=1e-12, atol=0)


def test_extreme_pairs_keep_inf_and_nan_and_zeros():
    x = np.zeros((6, 6))
    d = _dask(x, 2)
    assert fastclip.norm(d).compute() == 0.0
    x[0, 0], x[5, 5] = 1e300, 1e-300  # a huge block and a tiny block
    np.testing.assert_allclose(fastclip.norm(_dask(x, 2)).compute(), 1e300, rtol=1e-15)
    x[3, 3] = np.inf  # inf in a plain block, combined with a rescaled one: inf, not inf * 0
    assert fastclip.norm(_dask(x, 2)).compute() == np.inf
    assert fastclip.norm(_dask(x, 2), 3.5).compute() == np.inf
    x[4, 1] = np.nan
    assert np.isnan(fastclip.norm(_dask(x, 2)).compute())
    assert np.isnan(fastclip.global_norm([_dask(x, 2), da.ones(3)], 3.5).compute())


def test_empty_and_zero_d():
    assert fastclip.norm(da.ones((0, 3), chunks=(1, 2))).compute() == 0.0
    assert_close(fastclip.norm(da.ones((4, 0), chunks=2), axis=1).compute(), np.zeros(4), "float64")
    assert fastclip.norm(da.asarray(np.float32(-3.0)), 1).compute() == 3.0


# ------------------------------------------------------------- clipping


@pytest.mark.parametrize("chunks", list(CHUNKS_2D), ids=list(CHUNKS_2D))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_clip_by_norm_and_normalize_across_chunk_boundaries(chunks, dtype, ord, axis):
    x = _data((13, 17), dtype, seed=5)
    x[2] *= 0.01  # some slices below the bound, others above
    d = _dask(x, CHUNKS_2D[chunks])
    c = 0.8 * float(np.median(ref.norm(x, ord, axis=axis)))
    out = fastclip.clip_by_norm(d, c, ord, axis=axis)
    assert isinstance(out, da.Array) and out.chunks == d.chunks and out.dtype == x.dtype
    assert_close(out.compute(), ref.clip_by_norm(x, c, ord, axis=axis), dtype, atol=1e-12)
    out = fastclip.normalize(d, ord, axis=axis)
    assert_close(out.compute(), ref.normalize(x, ord, axis=axis), dtype, atol=1e-12)


@pytest.mark.parametrize("axis", [(0, 2), (1, 2), (0, 1), 0, 2])
@pytest.mark.parametrize("ord", ORDS)
def test_clip_by_norm_3d_tuple_axes(axis, ord):
    x = _data((5, 7, 8), "float32", seed=6)
    c = float(np.median(ref.norm(x, ord, axis=axis)))
    got = fastclip.clip_by_norm(_dask(x, CHUNKS_3D), c, ord, axis=axis).compute()
    assert_close(got, ref.clip_by_norm(x, c, ord, axis=axis), "float32", atol=1e-7)


def test_clip_by_norm_float16_blocks():
    x = _data((33, 5), "float16", seed=7)
    got = fastclip.clip_by_norm(_dask(x, (10, 3)), 1.0, axis=1).compute()
    assert got.dtype == np.float16
    assert_close(got, ref.clip_by_norm(x, 1.0, axis=1).astype(np.float16), "float16", atol=1e-3)


@pytest.mark.parametrize("ord", ORDS)
def test_global_norm_and_clip_by_global_norm(ord):
    xs = [_data((13, 17), "float32", 8), _data((29,), "float64", 9), _data((3, 4, 5), "float32")]
    ds = [_dask(xs[0], (5, 6)), _dask(xs[1], 10), _dask(xs[2], (2, 4, 3))]
    total = fastclip.global_norm(ds, ord)
    assert isinstance(total, da.Array)
    assert total.dtype == np.float64  # one float64 array makes the norm float64
    # float32 members are summed in float32 blocks (as the core): float32 tolerance
    assert_close(total.compute(), ref.global_norm(xs, ord), "float32")
    assert fastclip.global_norm(ds[::2], ord).dtype == np.float32
    c = 0.5 * float(ref.global_norm(xs, ord))
    outs, n = fastclip.clip_by_global_norm(ds, c, ord)
    want, want_n = ref.clip_by_global_norm(xs, c, ord)
    assert_close(n.compute(), want_n, "float32")
    for o, w, x in zip(outs, want, xs):
        assert isinstance(o, da.Array) and o.dtype == x.dtype
        assert_close(o.compute(), w, "float32", atol=1e-12)
    # a given (lazy) total norm is used as is
    outs, n = fastclip.clip_by_global_norm(ds, 1.0, ord, total_norm=da.asarray(4.0), eps=0.0)
    assert_close(outs[1].compute(), xs[1] / 4.0, "float64")
    assert float(n.compute()) == 4.0


def test_clip_by_value_and_integers():
    x = _data((13, 17), "float32")
    x[0, 0] = np.nan
    got = fastclip.clip_by_value(_dask(x, (5, 6)), -0.5, 0.25)
    assert isinstance(got, da.Array)
    assert_close(got.compute(), ref.clip_by_value(x, -0.5, 0.25), "float32")
    ints = np.arange(-20, 20, dtype=np.int16)
    got = fastclip.clip_by_value(_dask(ints, 7), -3.5, 4.5).compute()
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, np.clip(ints, -3, 4))


def test_clip_coefficient_and_scale_stay_lazy():
    x = _data((13, 17), "float64")
    d = _dask(x, (5, 6))
    coef = fastclip.clip_coefficient(fastclip.norm(d), 1.0)
    assert isinstance(coef, da.Array)
    fastclip.scale_(d, coef)
    assert_close(d.compute(), ref.clip_by_norm(x, 1.0), "float64")
    fastclip.scale_([d], 2.0)
    assert_close(d.compute(), 2.0 * ref.clip_by_norm(x, 1.0), "float64")


# --------------------------------------------------------------- laziness


def _refusing_scheduler(dsk, keys, **kwargs):
    raise AssertionError("something was computed while the graph was being built")


def test_every_function_stays_lazy(monkeypatch):
    """No Numba kernel runs and no scheduler is called until .compute()."""
    launches = []
    real_run = _cpu.run

    def counting_run(name, n, *args):
        launches.append(name)
        return real_run(name, n, *args)

    for module in (_cpu, _axes, _core, _pack):  # every module that looks ``run`` up
        monkeypatch.setattr(module, "run", counting_run)
    x = _data((13, 17), "float32")
    with dask.config.set(scheduler=_refusing_scheduler):
        d = _dask(x, (5, 6))
        e = _dask(x[:3], 2)
        results = [
            fastclip.norm(d),
            fastclip.norm(d, 3, axis=1),
            fastclip.global_norm([d, e], math.inf),
            fastclip.clip_by_value(d, -0.1, 0.1),
            fastclip.clip_by_norm(d, 1.0, axis=0),
            fastclip.normalize(d, 1),
            fastclip.clip_coefficient(fastclip.norm(d), 1.0),
            *fastclip.clip_by_global_norm([d, e], 1.0),
        ]
        f, g, h, k = (d.copy() for _ in range(4))
        results += [
            fastclip.clip_by_value_(f, -0.1, 0.1),
            fastclip.clip_by_norm_(g, 1.0, axis=1),
            fastclip.normalize_(h),
            fastclip.clip_by_global_norm_([k, e], 1.0),
        ]
        fastclip.scale_([f, g], fastclip.clip_coefficient(fastclip.norm(h), 1.0))
        results += [f, g, h, k, e]
    flat = [r for item in results for r in (item if isinstance(item, list) else [item])]
    assert all(isinstance(r, da.Array) for r in flat)
    assert launches == []  # nothing computed
    computed = dask.compute(*flat, scheduler="sync")
    assert launches  # the Numba kernels did the work
    assert_close(computed[1], ref.norm(x, 3, axis=1), "float32")


# ----------------------------------------------------- in-place semantics


def test_in_place_rebinds_the_array_object():
    """In place on dask = dask's own ``x[...] = v``: the object gets the new graph."""
    x = _data((13, 17), "float64")
    d = _dask(x, (5, 6))
    before = d + 0  # derived before: keeps the old values (dask arrays are values)
    n = fastclip.clip_by_norm_(d, 1.0, axis=1)
    assert isinstance(n, da.Array)
    assert_close(n.compute(), ref.norm(x, axis=1), "float64")  # norms before clipping
    assert_close(d.compute(), ref.clip_by_norm(x, 1.0, axis=1), "float64")
    assert_close(before.compute(), x, "float64")
    assert fastclip.clip_by_value_(d, 0.0, 0.1) is d
    assert_close(d.compute(), np.clip(ref.clip_by_norm(x, 1.0, axis=1), 0.0, 0.1), "float64")
    ds = [_dask(x, 4), _dask(2 * x, 7)]
    total = fastclip.clip_by_global_norm_(ds, 1.0, eps=0.0)
    assert_close(total.compute(), ref.global_norm([x, 2 * x]), "float64")
    assert_close(fastclip.global_norm(ds).compute(), 1.0, "float64")
    n = fastclip.normalize_(ds[0], eps=0.0)
    want = ref.norm(x) / ref.global_norm([x, 2 * x])
    assert_close(n.compute(), want, "float64")  # the norm before normalising
    assert_close(fastclip.norm(ds[0]).compute(), 1.0, "float64")


def test_error_if_nonfinite_raises_before_rebinding():
    x = sample((20,), 0)
    x[3] = np.nan
    d = _dask(x, 6)
    name = d.name
    with pytest.raises(fastclip.NonFiniteNormError):
        fastclip.clip_by_global_norm_([d], 1.0, error_if_nonfinite=True)
    assert d.name == name
    outs, n = fastclip.clip_by_global_norm([_dask(x[4:], 6)], 1.0, error_if_nonfinite=True)
    assert isinstance(outs[0], da.Array) and isinstance(n, da.Array)
    assert_close(n.compute(), ref.norm(x[4:]), "float64")
    assert_close(outs[0].compute(), ref.clip_by_norm(x[4:], 1.0), "float64")


# -------------------------------------------------------------- bad input


def _unknown_chunks() -> da.Array:
    d = _dask(sample((30,), 0), 7)
    u = d[d > 0]
    assert any(math.isnan(c) for c in u.chunks[0])
    return u


@pytest.mark.parametrize(
    "call",
    [
        lambda u: fastclip.norm(u),
        lambda u: fastclip.norm(u, axis=0),
        lambda u: fastclip.global_norm([u]),
        lambda u: fastclip.clip_by_value(u, 0, 1),
        lambda u: fastclip.clip_by_value_(u, 0, 1),
        lambda u: fastclip.clip_by_norm(u, 1.0),
        lambda u: fastclip.clip_by_norm_(u, 1.0),
        lambda u: fastclip.normalize(u),
        lambda u: fastclip.normalize_(u),
        lambda u: fastclip.clip_by_global_norm([da.ones(3), u], 1.0),
        lambda u: fastclip.clip_by_global_norm_([da.ones(3), u], 1.0),
        lambda u: fastclip.scale_([u], 2.0),
    ],
)
def test_unknown_chunk_sizes_raise_a_clear_error(call):
    u = _unknown_chunks()
    name = u.name
    with (
        dask.config.set(scheduler=_refusing_scheduler),
        pytest.raises(ValueError, match=r"unknown.*compute_chunk_sizes\(\)"),
    ):
        call(u)
    assert u.name == name  # nothing rebound
    u.compute_chunk_sizes()
    assert_close(fastclip.norm(u).compute(), ref.norm(u.compute()), "float64")


def test_mixed_dask_and_numpy_raise_type_error():
    x = sample((5,), 0)
    d = _dask(x, 2)
    with pytest.raises(TypeError, match="same library"):
        fastclip.global_norm([d, x])
    with pytest.raises(TypeError, match="same library"):
        fastclip.global_norm([x, d])
    with pytest.raises(TypeError, match="same library"):
        fastclip.clip_by_global_norm([d, x.copy()], 1.0)
    with pytest.raises(TypeError, match="dask array"):
        fastclip.scale_([x.copy()], fastclip.norm(d))
    with pytest.raises(TypeError, match="dask array"):
        fastclip.clip_by_global_norm([x], 1.0, total_norm=fastclip.norm(d))


def test_bad_dtypes_and_route():
    assert _dispatch.route_of(da.ones(3)) == _dispatch.ROUTE_DASK
    assert fastclip.info()["routes"]["dask.array.Array"] == "dask"
    with pytest.raises(TypeError, match="floating-point"):
        fastclip.norm(da.arange(5))
    with pytest.raises(TypeError, match="floating-point"):
        fastclip.clip_by_norm(da.arange(5), 1.0)
    with pytest.raises(TypeError, match="complex"):
        fastclip.clip_by_value(da.ones(3, dtype=np.complex64), 0, 1)


# ------------------------------------------------------ bigger than memory


def test_larger_than_memory_norm_streams_chunk_by_chunk():
    """A lazily generated 256 MB array reduced with < 64 MB of NumPy memory at peak.

    NumPy reports its allocations to tracemalloc, so the peak counts every block
    the synchronous scheduler holds; a computation that materialised the array
    would need 256 MB.  The reference is a float64 power sum block by block.
    """
    n_chunks, chunk = 64, 1 << 19  # 64 blocks of 4 MB float64
    x = da.random.default_rng(42).standard_normal(n_chunks * chunk, chunks=chunk)
    total_bytes = x.nbytes
    expected = 0.0
    for block in x.blocks:  # one block at a time: the float64 chunk-by-chunk reference
        b = block.compute(scheduler="sync")
        expected += float(np.sum(b * b))
    expected = math.sqrt(expected)
    tracemalloc.start()
    try:
        got = fastclip.norm(x).compute(scheduler="sync")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total_bytes / 4, (peak, total_bytes)
    assert_close(got, np.float64(expected), "float64")


# -------------------------------------------------------- distributed


# pyproject turns warnings into errors.  With distributed 2026.8 this test emits
# none here, but distributed's teardown of worker processes and tornado sockets is
# known to leak ResourceWarning ("unclosed socket/transport") and, from __del__,
# PytestUnraisableExceptionWarning on loaded machines -- noise about distributed's
# own sockets, not fastclip.  Only those two are let through, for this test only.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_local_cluster_processes_loopback():
    distributed = pytest.importorskip("distributed", reason="distributed is not installed")
    start = time.perf_counter()
    x = _data((60, 50), "float32", seed=11)
    with (
        distributed.LocalCluster(
            processes=True,
            n_workers=2,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        d = _dask(x, (13, 17))
        n, clipped, (outs, total) = client.compute(
            [
                fastclip.norm(d, axis=0),
                fastclip.clip_by_norm(d, 1.0, axis=1),
                fastclip.clip_by_global_norm([d, d[:7]], 2.0),
            ],
            sync=True,
        )
        workers = client.run(lambda: __import__("os").getpid())
        assert len(set(workers.values())) == 2
    assert_close(n, ref.norm(x, axis=0), "float32")
    assert_close(clipped, ref.clip_by_norm(x, 1.0, axis=1), "float32", atol=1e-7)
    want, want_total = ref.clip_by_global_norm([x, x[:7]], 2.0)
    assert_close(total, want_total, "float32")
    for o, w in zip(outs, want):
        assert_close(o, w, "float32", atol=1e-7)
    assert time.perf_counter() - start < 20


# ----------------------------------------- data safety on the Dask route


def test_dask_out_of_place_per_slice_leaves_numpy_source_alone():
    da = pytest.importorskip("dask.array")
    data = np.full((2, 1, 3), 5.0)
    src = data.copy()
    x = da.from_array(src, chunks=(1, 1, 3))
    out = fastclip.clip_by_norm(x, 1.0, axis=1).compute()
    np.testing.assert_allclose(out, ref.clip_by_norm(data, 1.0, axis=1), rtol=1e-12)
    out = fastclip.normalize(x, axis=1).compute()
    np.testing.assert_allclose(out, ref.normalize(data, axis=1), rtol=1e-12)
    np.testing.assert_array_equal(src, data)


@pytest.mark.parametrize("chunks", [2, 1, (1, 1)])
def test_subnormal_dask_norms(chunks):
    da = pytest.importorskip("dask.array")
    data = np.array([1e-310, 2e-310])
    x = da.from_array(data, chunks=chunks if chunks != (1, 1) else 1)
    expected = ref.norm(data)
    np.testing.assert_allclose(fastclip.norm(x).compute(), expected, rtol=1e-12)
    np.testing.assert_allclose(fastclip.global_norm([x, x]).compute(), ref.global_norm([data] * 2))
    np.testing.assert_array_equal(fastclip.clip_by_norm(x, 1.0).compute(), data)
    np.testing.assert_allclose(fastclip.norm(x, 3).compute(), ref.norm(data, 3), rtol=1e-12)


def test_integer_clip_by_value_dask():
    da = pytest.importorskip("dask.array")
    data = np.array([-128, -3, 0, 1, 5, 127], np.int8)
    for lo, hi in SATURATING_INT_BOUNDS:
        out = fastclip.clip_by_value(da.from_array(data, chunks=2), lo, hi).compute()
        np.testing.assert_array_equal(out, ref.clip_by_value(data, lo, hi))


@pytest.mark.parametrize("dtype", UNSUPPORTED_DTYPES, ids=str)
def test_dask_refuses_byte_swapped_and_long_double_at_graph_time(dtype):
    da = pytest.importorskip("dask.array")
    dt = np.dtype(dtype)
    src = np.arange(1, 5).astype(dt)
    x = da.from_array(src, chunks=2)
    calls = [lambda: fastclip.clip_by_value(x, -1.0, 1.0)]
    if dt.kind in "fc":
        calls += [lambda: fastclip.norm(x), lambda: fastclip.clip_by_norm(x, 1.0)]
    with unchanged(src):
        for call in calls:
            if dt.kind == "c" and call is calls[0]:
                with pytest.raises(TypeError, match="complex"):
                    call()
                continue
            with pytest.raises(TypeError, match=r"byte order|no kernels for"):
                call()
