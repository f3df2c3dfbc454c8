"""The GPU route's float64-accumulating norm (``fastclip/_gpu/_wide.py``), its host
side run on the CPU against a Python twin of its CUDA kernels.

This file owns ``norm64``'s driver (``_wide.py``); shared emulation helpers are in
tests/_gpu_emulation.py, the other GPU drivers' twins in the files beside it.

As in ``test_gpu_host_emulated.py``: "device memory" is NumPy memory, pointers
are host addresses, and ``fastclip_partial_pow_sum_wide`` / ``fastclip_finish_wide``
are replaced by their Python twin (tests/_gpu_wide_twin.py, a transcription of
the CUDA source); ``test_gpu_wide_host_compiled.py`` runs the CUDA source itself
against that twin.

References: the exactly rounded norm (``math.fsum`` of the widened elements'
powers, then the root) and the CPU route's wide kernels (``_cpu/_wide_kernels.py``).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
from _gpu_wide_twin import (
    CTYPES_BY_NAME,
    DTYPES,
    LAUNCHES,
    ORDS,
    HostLib,
    data,
    dyadic,
    emulate,
    exact,
    finish_wide,
    partial_wide,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastclip import _config as cfg
from fastclip import _dispatch
from fastclip import _gpu as gpu
from fastclip._gpu import _adapters, _modules, _tables


@pytest.fixture(autouse=True)
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_modules, "kernel", lambda feature, device, name, targ: emulate(name, targ))
    monkeypatch.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    monkeypatch.setattr(cfg, "GPU_CHUNK", 100)  # many chunks; vectors and ragged tails
    monkeypatch.setattr(cfg, "GPU_BLOCK", 32)
    monkeypatch.setattr(cfg, "GPU_FINISH_BLOCK", 64)
    _tables.TABLES.clear()
    LAUNCHES.clear()
    HostLib.syncs = 0


def _norm64(arrays: list[np.ndarray], ord: float) -> np.ndarray:
    code, p = ORDS[ord]
    out = gpu.norm64(HostLib, arrays, code, p, None, True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == ()
    return out


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_exactly_rounded_norm(dtype: str, ord: float) -> None:
    arrays = [data(n, dtype, seed) for seed, n in enumerate((1003, 0, 5, 64, 257))]
    before = [a.copy() for a in arrays]
    got = float(_norm64(arrays, ord))
    # float64 sums of ~1.3e3 terms: a few 1e-16 relative; float32 sums would be ~1e-7
    assert got == pytest.approx(exact(arrays, ord), rel=1e-14, abs=0.0)
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert HostLib.syncs == 0  # the norm stays in device memory


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_agrees_with_the_cpu_routes_wide_kernels(dtype: str, ord: float) -> None:
    arrays = [data(n, dtype, 10 + n) for n in (3000, 17, 1)]
    code, p = ORDS[ord]
    cpu = float(_dispatch.backend_for(arrays).norm64(arrays, code, p, None, wide=True))
    assert float(_norm64(arrays, ord)) == pytest.approx(cpu, rel=1e-14, abs=0.0)


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
def test_mixed_dtypes_one_launch_per_dtype(ord: float) -> None:
    arrays = [data(n, d, i) for i, (d, n) in enumerate(zip(DTYPES * 2, (50, 7, 301, 9, 0, 1)))]
    assert float(_norm64(arrays, ord)) == pytest.approx(exact(arrays, ord), rel=1e-14, abs=0.0)
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
    arrays = [data(500, "float32", 1), data(70, "bfloat16", 2)]
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
    x = data(450, dtype, 7)
    x[123] = np.nan
    assert math.isnan(float(_norm64([data(9, dtype, 8), x], ord)))
    x[123] = np.inf
    assert float(_norm64([data(9, dtype, 8), x], ord)) == math.inf
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
    assert float(_norm64([near_max, data(40, "float16", 1)], 3)) == pytest.approx(expect, rel=1e-14)
    # widened float32 squares of 3e38 stay in float64's range: no rescaling needed
    LAUNCHES.clear()
    assert float(_norm64([near_max], 2)) == pytest.approx(math.sqrt(5.0) * 3e38, rel=1e-7)
    assert [w for n, _, m, w in LAUNCHES if n == "fastclip_partial_pow_sum_wide"] == [True]
    assert HostLib.syncs == 0


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
    whole = dyadic(6000, dtype, 3)
    parts = np.split(whole, sorted(cuts))
    one, split = float(_norm64([whole], ord)), float(_norm64(parts, ord))
    assert one == split == exact([whole], ord)


def test_the_split_test_would_fail_on_float32_thread_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason for the wide kernels: the same twin summing in float32 per thread
    (``chunk_pow_sum``'s accumulator for float32 data) gives split-dependent norms on
    the data above, so the test above can fail."""
    monkeypatch.setattr(cfg, "GPU_CHUNK", 4096)
    narrow = {
        "fastclip_partial_pow_sum_wide": lambda targ: (
            lambda g, b, a: partial_wide(targ, b[0], a, np.float32)
        ),
        "fastclip_finish_wide": lambda targ: lambda g, b, a: finish_wide(targ, b[0], a),
    }
    monkeypatch.setattr(_modules, "kernel", lambda f, d, name, targ: narrow[name](targ))
    whole = dyadic(60_000, "float32", 4)
    one = float(_norm64([whole], 2))
    split = float(_norm64(np.split(whole, [1, 4097, 33_333]), 2))
    assert one != split or one != exact([whole], 2)


def test_bad_dtype_raises_before_any_launch() -> None:
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        gpu.norm64(HostLib, [np.ones(3), np.ones(3, np.int32)], 2, 2.0, None, True)
    assert LAUNCHES == []


def test_checked_tables_are_reused() -> None:
    """``check_targets``' packed tables (the in-place clip's checks) serve the norm."""
    arrays = [data(300, "float32", 1), data(20, "float64", 2)]
    checked = gpu.check_targets(HostLib, arrays, "clip_by_global_norm")
    assert isinstance(checked, _tables.Packed)
    got = float(gpu.norm64(HostLib, arrays, 2, 2.0, checked, True))
    assert got == pytest.approx(exact(arrays, 2), rel=1e-14, abs=0.0)


def test_the_dispatchers_norm64_routes_wide_gpu_calls_only() -> None:
    """``Backend.norm64`` on the GPU route: the wide kernels with ``wide=True``; None
    without (its callers then take ``fastclip.global_norm``)."""
    backend = _dispatch.Backend(_dispatch.ROUTE_GPU, gpu, HostLib)
    arrays = [data(333, "float16", 1)]
    assert backend.norm64(arrays, 2, 2.0) is None and LAUNCHES == []
    got = backend.norm64(arrays, 2, 2.0, None, wide=True)
    assert float(got) == pytest.approx(exact(arrays, 2), rel=1e-14, abs=0.0)
    assert {n for n, *_ in LAUNCHES} == {"fastclip_partial_pow_sum_wide", "fastclip_finish_wide"}


def test_distributed_local_norm_takes_the_gpu_wide_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fastclip.distributed``'s local norm of GPU-route arrays is ``norm64``'s value
    (NumPy memory standing in for CuPy arrays; read on the host only because torch
    has no CUDA here)."""
    from fastclip.distributed import _local

    backend = _dispatch.Backend(_dispatch.ROUTE_GPU, gpu, HostLib)
    monkeypatch.setattr(_dispatch, "backend_for", lambda arrays, **kw: backend)
    whole = dyadic(3000, "float32", 9)
    parts = [*np.split(whole, [17, 1500]), dyadic(40, "float64", 10)]
    ref = exact(parts, 2)
    assert _local.local_norm(parts, 2, 2.0) == ref
    assert _local.local_norm([np.concatenate(parts)], 2, 2.0) == ref  # the split: no bit moves
    assert {n for n, *_ in LAUNCHES} == {"fastclip_partial_pow_sum_wide", "fastclip_finish_wide"}
