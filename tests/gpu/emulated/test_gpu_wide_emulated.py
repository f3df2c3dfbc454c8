"""The GPU route's float64-accumulating norm (``fastclip/_gpu/_wide.py``), its host
side run on the CPU against a Python twin of its CUDA kernels.

This file owns ``norm64``'s driver (``_wide.py``); shared emulation helpers are in
tests/_gpu_emulation.py, the other GPU drivers' twins in the files beside it.

As in ``test_gpu_host_emulated.py``: "device memory" is NumPy memory, pointers
are host addresses, and ``fastclip_partial_pow_sum_wide`` / ``fastclip_finish_wide``
are replaced by a transcription of their CUDA source (``kernels.cu``, the wide
section) that reads and writes through the raw addresses in kernel argument
order: each thread's float64 sum in the kernel's order (16-byte vectors where the
chunk is aligned, then the strided tail), the warp-shuffle tree of
``block_reduce``, the gated rescaling modes and the finish stages.  The one
difference from the device: nvcc may fuse ``acc + a * a`` into one FMA (one
rounding fewer), so device and twin agree to float64 rounding, not bit for bit.

References: the exactly rounded norm (``math.fsum`` of the widened elements'
powers, then the root) and the CPU route's wide kernels (``_cpu/_wide_kernels.py``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import _gpu_emulation
import numpy as np
import pytest
from _gpu_emulation import mem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastclip import _config as cfg
from fastclip import _dispatch
from fastclip import _gpu as gpu
from fastclip._gpu import _adapters, _modules, _tables

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (NumPy bfloat16) is not installed")
BF16 = np.dtype(ml_dtypes.bfloat16)
CTYPES = {**_gpu_emulation.CTYPES, "__nv_bfloat16": BF16}
KINDS = {"float16", "float32", "float64", "bfloat16"}
ORDS = {1: (1, 1.0), 2: (2, 2.0), math.inf: (0, math.inf), 3: (3, 3.0)}
DTYPES = ["float16", "float32", "float64", "bfloat16"]

#: every launch: (kernel name, C++ type, mode or stage, whether its blocks did any work)
LAUNCHES: list[tuple[str, str, int, bool]] = []

# ------------------------------------------------------------ the CUDA twin


def _combine(a: np.ndarray, b: np.ndarray, ord_code: int) -> np.ndarray:
    """``combine`` elementwise: max letting NaN win (``max_nan``) or the float64 sum."""
    return np.maximum(a, b) if ord_code == 0 else a + b


def _block_reduce(v: np.ndarray, ord_code: int) -> float:
    """``block_reduce`` of one value per thread: ``warp_reduce`` (``__shfl_down_sync``
    with offsets 16..1; a lane past the warp's end reads its own value), lane 0 of
    each warp into ``shared``, then warp 0 reduces ``shared`` (0 past ``nwarps``)."""
    assert v.size % 32 == 0, "blockDim is a multiple of the warp size"

    def warp(w: np.ndarray) -> float:
        for off in (16, 8, 4, 2, 1):
            w = _combine(w, np.concatenate([w[off:], w[32 - off :]]), ord_code)
        return float(w[0])

    shared = np.array([warp(v[i : i + 32]) for i in range(0, v.size, 32)])
    return warp(np.concatenate([shared, np.zeros(32 - shared.size)]))


def _wide_terms(x: np.ndarray, ord_code: int, p: float, inv: float) -> np.ndarray:
    """``wide_term`` of every element: |x| widened to double, times inv, to the power."""
    a = np.abs(x.astype(np.float64)) * inv
    with np.errstate(all="ignore"):
        return a * a if ord_code == 2 else a if ord_code in (0, 1) else a**p


def _thread_sums(
    s: np.ndarray, terms: np.ndarray, ord_code: int, block: int, acc: Any = np.float64
) -> np.ndarray:
    """``thread_pow_sum_wide``: thread t's sum, in the kernel's order, in ``acc``
    (float64; float32 models the route's other kernel, for the contrast test)."""
    sums = np.zeros(block, acc)
    n, vec = terms.size, 16 // s.dtype.itemsize
    done = 0
    with np.errstate(all="ignore"):
        if s.ctypes.data % 16 == 0:  # aligned16: vector i goes to thread i % blockDim
            nv = n // vec
            rows = terms[: nv * vec].reshape(nv, vec).astype(acc)
            for r in range(0, nv, block):
                part = rows[r : r + block]
                for j in range(vec):
                    sums[: len(part)] = _combine(sums[: len(part)], part[:, j], ord_code)
            done = nv * vec
        tail = terms[done:].astype(acc)
        for r in range(0, tail.size, block):
            part = tail[r : r + block]
            sums[: len(part)] = _combine(sums[: len(part)], part, ord_code)
    return sums.astype(np.float64)


def _partial_wide(targ: str, block: int, a: tuple[Any, ...], acc: Any = np.float64) -> None:
    ptrs, sizes, ct, cs, nc, chunk, ord_code, p, mode, state, partials = a
    nc, ord_code, mode = int(nc), int(ord_code), int(mode)
    inv = 1.0
    if mode == 1:
        if mem(state, 2, np.float64)[1] == 0.0:
            LAUNCHES.append(("fastclip_partial_pow_sum_wide", targ, mode, False))
            return
        ord_code = 0
    elif mode == 2:
        inv = float(mem(state, 2, np.float64)[1])
        if not inv > 0.0:
            LAUNCHES.append(("fastclip_partial_pow_sum_wide", targ, mode, False))
            return
    LAUNCHES.append(("fastclip_partial_pow_sum_wide", targ, mode, True))
    ct_a, cs_a = mem(ct, nc, np.int64), mem(cs, nc, np.int64)
    n_t = int(ct_a.max()) + 1 if nc else 0
    ptr_a, size_a = mem(ptrs, n_t, np.uint64), mem(sizes, n_t, np.int64)
    out = mem(partials, nc, np.float64)
    for c in range(nc):
        t, start = int(ct_a[c]), int(cs_a[c])
        end = min(start + int(chunk), int(size_a[t]))
        seg = mem(ptr_a[t], size_a[t], CTYPES[targ])[start:end]
        terms = _wide_terms(seg, ord_code, float(p), inv)
        out[c] = _block_reduce(_thread_sums(seg, terms, ord_code, block, acc), ord_code)


def _root(v: float, ord_code: int, p: float) -> float:
    if ord_code in (0, 1):
        return v
    with np.errstate(all="ignore"):
        return float(np.sqrt(v)) if ord_code == 2 else float(np.power(v, 1.0 / p))


def _finish_wide(targ: str, block: int, a: tuple[Any, ...]) -> None:
    partials, n, ord_code, p, stage, safe_lo, safe_hi, state, norm_out = a
    n, ord_code, p, stage = int(n), int(ord_code), float(p), int(stage)
    st_a = mem(state, 2, np.float64, null_is_empty=True)
    out = mem(norm_out, 1, CTYPES[targ])
    LAUNCHES.append(("fastclip_finish_wide", targ, stage, True))
    if stage == 2 and st_a[1] == 0.0:
        return
    if stage == 3 and not st_a[1] > 0.0:
        out[0] = _root(float(st_a[0]), ord_code, p)
        return
    oc = 0 if stage == 2 else ord_code
    parts = mem(partials, n, np.float64)
    per_thread = np.zeros(block)
    for i in range(n):  # thread i % blockDim combines partials i, i + blockDim, ...
        per_thread[i % block] = _combine(per_thread[i % block], parts[i], oc)
    v = _block_reduce(per_thread, oc)
    if stage == 0:
        out[0] = _root(v, ord_code, p)
    elif stage == 1:
        st_a[0] = v
        st_a[1] = 0.0 if float(safe_lo) < v < float(safe_hi) else -1.0
    elif stage == 2:
        e = math.frexp(v)[1] if math.isfinite(v) else 0
        st_a[1] = math.ldexp(1.0, max(-1022, min(1023, -e))) if 0.0 < v < math.inf else 0.0
    else:
        out[0] = _root(v, 2 if ord_code == 2 else 3, p) / float(st_a[1])


def _emulate(name: str, targ: str) -> Any:
    if name == "fastclip_partial_pow_sum_wide":
        return lambda grid, block, a: _partial_wide(targ, block[0], a)
    if name == "fastclip_finish_wide":
        return lambda grid, block, a: _finish_wide(targ, block[0], a)
    raise AssertionError(f"norm64 launched {name}")


class HostLib(_gpu_emulation.HostLib):
    """The GPU adapter interface over NumPy memory (bfloat16: ml_dtypes)."""

    kind = staticmethod(lambda x: str(x.dtype) if str(x.dtype) in KINDS else None)


@pytest.fixture(autouse=True)
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        _modules, "kernel", lambda feature, device, name, targ: _emulate(name, targ)
    )
    monkeypatch.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    monkeypatch.setattr(cfg, "GPU_CHUNK", 100)  # many chunks; vectors and ragged tails
    monkeypatch.setattr(cfg, "GPU_BLOCK", 32)
    monkeypatch.setattr(cfg, "GPU_FINISH_BLOCK", 64)
    _tables.TABLES.clear()
    LAUNCHES.clear()
    HostLib.syncs = 0


# --------------------------------------------------------------- references


def _exact(parts: list[np.ndarray], ord: float) -> float:
    """The norm in exact arithmetic of the widened elements, rounded once."""
    flat = np.concatenate([np.abs(a.astype(np.float64)).ravel() for a in parts])
    if ord == math.inf:
        return math.nan if np.isnan(flat).any() else (float(flat.max()) if flat.size else 0.0)
    if ord == 2:
        return math.sqrt(math.fsum(flat * flat))
    if ord == 1:
        return math.fsum(flat)
    return math.fsum(flat**ord) ** (1.0 / ord)


def _data(n: int, dtype: str, seed: int, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(CTYPES_BY_NAME[dtype])


CTYPES_BY_NAME = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
CTYPES_BY_NAME["bfloat16"] = BF16


def _norm64(arrays: list[np.ndarray], ord: float) -> np.ndarray:
    code, p = ORDS[ord]
    out = gpu.norm64(HostLib, arrays, code, p, None, True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == ()
    return out


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_exactly_rounded_norm(dtype: str, ord: float) -> None:
    arrays = [_data(n, dtype, seed) for seed, n in enumerate((1003, 0, 5, 64, 257))]
    before = [a.copy() for a in arrays]
    got = float(_norm64(arrays, ord))
    # float64 sums of ~1.3e3 terms: a few 1e-16 relative; float32 sums would be ~1e-7
    assert got == pytest.approx(_exact(arrays, ord), rel=1e-14, abs=0.0)
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert HostLib.syncs == 0  # the norm stays in device memory


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_agrees_with_the_cpu_routes_wide_kernels(dtype: str, ord: float) -> None:
    arrays = [_data(n, dtype, 10 + n) for n in (3000, 17, 1)]
    code, p = ORDS[ord]
    cpu = float(_dispatch.backend_for(arrays).norm64(arrays, code, p, None, wide=True))
    assert float(_norm64(arrays, ord)) == pytest.approx(cpu, rel=1e-14, abs=0.0)


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
def test_mixed_dtypes_one_launch_per_dtype(ord: float) -> None:
    arrays = [_data(n, d, i) for i, (d, n) in enumerate(zip(DTYPES * 2, (50, 7, 301, 9, 0, 1)))]
    assert float(_norm64(arrays, ord)) == pytest.approx(_exact(arrays, ord), rel=1e-14, abs=0.0)
    ran = [(name, targ) for name, targ, _, worked in LAUNCHES if worked]
    partial = sorted(t for n, t in ran if n == "fastclip_partial_pow_sum_wide")
    assert partial == sorted(_modules.ELEMENT_TYPES.values())  # each dtype read once
    # the float64 array asks for the gated rescaling passes for L2 and p = 3; in range,
    # their blocks return at once (no second read of the data)
    gated = ord in (2, 3)
    assert len(LAUNCHES) == (3 * 4 + 3 if gated else 4 + 1)
    assert all(t == "double" for n, t, _, _ in LAUNCHES if n == "fastclip_finish_wide")


def test_float32_l2_takes_one_pass_and_one_finish() -> None:
    """Widened float32 / 16-bit squares cannot leave the float64 safe range: no gates."""
    arrays = [_data(500, "float32", 1), _data(70, "bfloat16", 2)]
    _norm64(arrays, 2)
    assert [(n, m) for n, _, m, _ in LAUNCHES] == [
        ("fastclip_partial_pow_sum_wide", 0),
        ("fastclip_partial_pow_sum_wide", 0),
        ("fastclip_finish_wide", 0),
    ]


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_zero_arrays(dtype: str, ord: float) -> None:
    dt = CTYPES_BY_NAME[dtype]
    assert float(_norm64([np.zeros(0, dt)], ord)) == 0.0
    assert float(_norm64([np.zeros(0, dt), np.zeros(0, dt)], ord)) == 0.0
    zeros = [np.zeros(130, dt), np.zeros(0, dt), np.zeros(3, dt)]
    got = _norm64(zeros, ord)
    assert float(got) == 0.0 and not math.isnan(float(got))


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate(dtype: str, ord: float) -> None:
    x = _data(450, dtype, 7)
    x[123] = np.nan
    assert math.isnan(float(_norm64([_data(9, dtype, 8), x], ord)))
    x[123] = np.inf
    assert float(_norm64([_data(9, dtype, 8), x], ord)) == math.inf
    x[5] = -np.inf
    assert float(_norm64([x], ord)) == math.inf


def test_rescaling_keeps_out_of_range_power_sums_finite() -> None:
    """The CPU route's robust_norm rule, decided on the device (no host read)."""
    big, tiny = np.array([1e200, 1e200, -1e200]), np.array([1e-310, 2e-310])
    assert float(_norm64([big], 2)) == pytest.approx(math.sqrt(3.0) * 1e200, rel=1e-15)
    assert float(_norm64([tiny], 2)) == pytest.approx(math.sqrt(5.0) * 1e-310, rel=1e-6)
    assert float(_norm64([big, tiny], 3)) == pytest.approx(3.0 ** (1 / 3) * 1e200, rel=1e-14)
    # p = 3 of float32 values near their maximum: the plain cubes overflow float64
    near_max = np.full(5, 3e38, np.float32)
    expect = 5.0 ** (1 / 3) * float(near_max[0])
    assert float(_norm64([near_max, _data(40, "float16", 1)], 3)) == pytest.approx(
        expect, rel=1e-14
    )
    # widened float32 squares of 3e38 stay in float64's range: no rescaling needed
    LAUNCHES.clear()
    assert float(_norm64([near_max], 2)) == pytest.approx(math.sqrt(5.0) * 3e38, rel=1e-7)
    assert [w for n, _, m, w in LAUNCHES if n == "fastclip_partial_pow_sum_wide"] == [True]
    assert HostLib.syncs == 0


def _dyadic(n: int, dtype: str, seed: int) -> np.ndarray:
    """Values k / 256 with |k| <= 1024: every power sum below is exact in float64 (each
    square is a multiple of 2**-16 below 16, each cube of 2**-24 below 64), but not in
    float32 once a thread's sum passes 2**8 (squares) or 2**0 (cubes)."""
    k = np.random.default_rng(seed).integers(-1024, 1025, n)
    return (k / 256.0).astype(CTYPES_BY_NAME[dtype])


# the autouse fixture's patches hold for every example (TABLES is cleared in the test)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cuts=st.lists(st.integers(0, 6000), max_size=6),
    dtype=st.sampled_from(DTYPES),
    ord=st.sampled_from([1, 2, math.inf, 3]),
)
def test_the_split_does_not_change_a_bit(cuts: list[int], dtype: str, ord: float) -> None:
    """Exact power sums: every split gives the exactly rounded norm, bit for bit."""
    _tables.TABLES.clear()
    whole = _dyadic(6000, dtype, 3)
    parts = np.split(whole, sorted(cuts))
    one, split = float(_norm64([whole], ord)), float(_norm64(parts, ord))
    assert one == split == _exact([whole], ord)


def test_the_split_test_would_fail_on_float32_thread_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason for the wide kernels: the same twin summing in float32 per thread
    (``chunk_pow_sum``'s accumulator for float32 data) gives split-dependent norms on
    the data above, so the test above can fail."""
    monkeypatch.setattr(cfg, "GPU_CHUNK", 4096)
    narrow = {
        "fastclip_partial_pow_sum_wide": lambda targ: (
            lambda g, b, a: _partial_wide(targ, b[0], a, np.float32)
        ),
        "fastclip_finish_wide": lambda targ: lambda g, b, a: _finish_wide(targ, b[0], a),
    }
    monkeypatch.setattr(_modules, "kernel", lambda f, d, name, targ: narrow[name](targ))
    whole = _dyadic(60_000, "float32", 4)
    one = float(_norm64([whole], 2))
    split = float(_norm64(np.split(whole, [1, 4097, 33_333]), 2))
    assert one != split or one != _exact([whole], 2)


def test_bad_dtype_raises_before_any_launch() -> None:
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        gpu.norm64(HostLib, [np.ones(3), np.ones(3, np.int32)], 2, 2.0, None, True)
    assert LAUNCHES == []


def test_checked_tables_are_reused() -> None:
    """``check_targets``' packed tables (the in-place clip's checks) serve the norm."""
    arrays = [_data(300, "float32", 1), _data(20, "float64", 2)]
    checked = gpu.check_targets(HostLib, arrays, "clip_by_global_norm")
    assert isinstance(checked, _tables.Packed)
    got = float(gpu.norm64(HostLib, arrays, 2, 2.0, checked, True))
    assert got == pytest.approx(_exact(arrays, 2), rel=1e-14, abs=0.0)


def test_the_dispatchers_norm64_routes_wide_gpu_calls_only() -> None:
    """``Backend.norm64`` on the GPU route: the wide kernels with ``wide=True``; None
    without (its callers then take ``fastclip.global_norm``)."""
    backend = _dispatch.Backend(_dispatch.ROUTE_GPU, gpu, HostLib)
    arrays = [_data(333, "float16", 1)]
    assert backend.norm64(arrays, 2, 2.0) is None and LAUNCHES == []
    got = backend.norm64(arrays, 2, 2.0, None, wide=True)
    assert float(got) == pytest.approx(_exact(arrays, 2), rel=1e-14, abs=0.0)
    assert {n for n, *_ in LAUNCHES} == {"fastclip_partial_pow_sum_wide", "fastclip_finish_wide"}


def test_distributed_local_norm_takes_the_gpu_wide_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fastclip.distributed``'s local norm of GPU-route arrays is ``norm64``'s value
    (NumPy memory standing in for CuPy arrays; read on the host only because torch
    has no CUDA here)."""
    from fastclip.distributed import _local

    backend = _dispatch.Backend(_dispatch.ROUTE_GPU, gpu, HostLib)
    monkeypatch.setattr(_dispatch, "backend_for", lambda arrays, **kw: backend)
    whole = _dyadic(3000, "float32", 9)
    parts = [*np.split(whole, [17, 1500]), _dyadic(40, "float64", 10)]
    ref = _exact(parts, 2)
    assert _local.local_norm(parts, 2, 2.0) == ref
    assert _local.local_norm([np.concatenate(parts)], 2, 2.0) == ref  # the split: no bit moves
    assert {n for n, *_ in LAUNCHES} == {"fastclip_partial_pow_sum_wide", "fastclip_finish_wide"}
