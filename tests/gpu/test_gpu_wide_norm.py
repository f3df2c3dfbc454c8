"""The GPU route's float64-accumulating norm (``norm64(..., wide=True)``,
``fastclip/_gpu/_wide.py``) on a CUDA device: against the exactly rounded norm
(``math.fsum`` of the widened elements) and the CPU route's wide kernels, for
independence from how the data is split, and through ``fastclip.distributed``'s
local norm for torch CUDA tensors and CuPy arrays.

This file owns those device checks; the driver's host side runs everywhere in
tests/gpu/emulated/test_gpu_wide_emulated.py, the source's compilation in
tests/gpu/test_gpu_compile.py.  Skips (the whole module, with the reason)
without a CUDA device, torch or CuPy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from _backends import require_gpu_module

from fastclip import _dispatch

torch = require_gpu_module()
cupy = pytest.importorskip("cupy", reason="CuPy is not installed")

from fastclip.distributed import _local  # noqa: E402  (imports torch: after the skip)

ORDS = {1: (1, 1.0), 2: (2, 2.0), math.inf: (0, math.inf), 3: (3, 3.0)}
TORCH = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
TORCH["bfloat16"] = torch.bfloat16


def _exact(parts: list[np.ndarray], ord: float) -> float:
    """The norm in exact arithmetic of the widened elements, rounded once."""
    flat = np.concatenate([np.abs(a.astype(np.float64)).ravel() for a in parts])
    if ord == math.inf:
        return float(flat.max()) if flat.size else 0.0
    if ord == 2:
        return math.sqrt(math.fsum(flat * flat))
    if ord == 1:
        return math.fsum(flat)
    return math.fsum(flat**ord) ** (1.0 / ord)


def _host(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n) * 3.0


def _tensors(dtype: str, sizes: tuple[int, ...]) -> list[Any]:
    return [torch.from_numpy(_host(n, i)).to(TORCH[dtype]).cuda() for i, n in enumerate(sizes)]


def _as_f64(arrays: list[Any]) -> list[np.ndarray]:
    """The arrays' values in float64 on the host (every widening here is exact)."""
    if isinstance(arrays[0], torch.Tensor):
        return [a.double().cpu().numpy() for a in arrays]
    return [cupy.asnumpy(a).astype(np.float64) for a in arrays]


def _gpu_norm(arrays: list[Any], ord: float) -> Any:
    code, p = ORDS[ord]
    return _dispatch.backend_for(arrays).norm64(arrays, code, p, None, wide=True)


# 70_000 and 1_000_003: several 65,536-element chunks and a ragged last one
SIZES = (1_000_003, 0, 5, 70_000)


# CuPy has no bfloat16 dtype: torch CUDA tensors cover it
CASES = [("torch", d) for d in TORCH] + [("cupy", d) for d in ("float16", "float32", "float64")]


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
@pytest.mark.parametrize(("library", "dtype"), CASES)
def test_matches_fsum_and_the_cpu_wide_kernels(library: str, dtype: str, ord: float) -> None:
    ts = _tensors(dtype, SIZES)
    arrays = ts if library == "torch" else [cupy.from_dlpack(t) for t in ts]
    got = _gpu_norm(arrays, ord)
    if library == "torch":
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
        assert got.shape == () and got.device == ts[0].device
    else:
        assert isinstance(got, cupy.ndarray) and got.dtype == np.float64 and got.shape == ()
    values = _as_f64(arrays)
    code, p = ORDS[ord]
    cpu_arrays = [t.cpu() for t in ts]
    cpu = float(_dispatch.backend_for(cpu_arrays).norm64(cpu_arrays, code, p, None, wide=True))
    assert float(got) == pytest.approx(_exact(values, ord), rel=1e-13, abs=0.0)
    assert float(got) == pytest.approx(cpu, rel=1e-13, abs=0.0)


@pytest.mark.parametrize("ord", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_the_split_does_not_change_the_norm(dtype: str, ord: float) -> None:
    (whole,) = _tensors(dtype, (3_000_000,))
    ref = _exact(_as_f64([whole]), ord)
    norms = [float(_gpu_norm([whole], ord))]
    for cuts in (
        [1, 4097, 123_457],
        [65_535, 65_537, 2_000_001],
        list(range(7, 3_000_000, 99_991)),
    ):
        norms.append(float(_gpu_norm(list(torch.tensor_split(whole, cuts)), ord)))
    for n in norms:
        assert n == pytest.approx(ref, rel=1e-14, abs=0.0)
    assert max(norms) - min(norms) <= 1e-14 * ref


def test_rescaling_keeps_out_of_range_power_sums_finite() -> None:
    big = torch.tensor([1e200, 1e200, -1e200], dtype=torch.float64, device="cuda")
    tiny = torch.tensor([1e-310, 2e-310], dtype=torch.float64, device="cuda")
    assert float(_gpu_norm([big], 2)) == pytest.approx(math.sqrt(3.0) * 1e200, rel=1e-15)
    assert float(_gpu_norm([tiny], 2)) == pytest.approx(math.sqrt(5.0) * 1e-310, rel=1e-6)
    assert float(_gpu_norm([big, tiny], 3)) == pytest.approx(3.0 ** (1 / 3) * 1e200, rel=1e-14)
    near_max = torch.full((5,), 3e38, dtype=torch.float32, device="cuda")
    expect = 5.0 ** (1 / 3) * float(near_max[0])
    assert float(_gpu_norm([near_max], 3)) == pytest.approx(expect, rel=1e-14)


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
def test_nan_inf_empty_and_zero(ord: float) -> None:
    (x,) = _tensors("float32", (200_000,))
    x[12345] = math.nan
    assert math.isnan(float(_gpu_norm([x], ord)))
    x[12345] = math.inf
    assert float(_gpu_norm([x], ord)) == math.inf
    empty = torch.zeros(0, device="cuda")
    assert float(_gpu_norm([empty], ord)) == 0.0
    assert float(_gpu_norm([torch.zeros(300_000, device="cuda"), empty], ord)) == 0.0


def test_distributed_local_norm_of_cuda_tensors_stays_on_the_device() -> None:
    """``fastclip.distributed``'s local norm of CUDA tensors: the wide kernels' value,
    a float64 CUDA tensor (NCCL reduces it), no host synchronisation."""
    ts = _tensors("bfloat16", (500_000, 3)) + _tensors("float32", (77_777,))
    ref = _exact(_as_f64(ts), 2)
    _local.local_norm(ts, 2, 2.0)  # compiles the kernels, uploads the table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _local.local_norm(ts, 2, 2.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    assert got.device == ts[0].device
    assert float(got) == pytest.approx(ref, rel=1e-13, abs=0.0)
    cpu = _local.local_norm([t.cpu() for t in ts], 2, 2.0)  # the CPU wide kernels
    assert float(got) == pytest.approx(cpu, rel=1e-13, abs=0.0)


def test_distributed_local_norm_of_cupy_arrays_is_a_cuda_tensor() -> None:
    arrays = [cupy.asarray(_host(n, n).astype(np.float32)) for n in (300_000, 9)]
    got = _local.local_norm(arrays, 2, 2.0)
    assert isinstance(got, torch.Tensor) and got.is_cuda and got.dtype == torch.float64
    assert float(got) == pytest.approx(_exact(_as_f64(arrays), 2), rel=1e-13, abs=0.0)


def test_distributed_local_norm_widens_complex_cuda_tensors() -> None:
    """Complex CUDA tensors (which the CUDA kernels do not take) beside real ones."""
    rng = np.random.default_rng(5)
    z = torch.from_numpy(rng.standard_normal(70_000) + 1j * rng.standard_normal(70_000))
    ts = [z.to(torch.complex64).cuda(), *_tensors("float32", (1000,))]
    got = _local.local_norm(ts, 2, 2.0)
    zc = ts[0].cpu().to(torch.complex128).numpy()
    sq = np.concatenate([zc.real**2, zc.imag**2, _as_f64(ts[1:])[0] ** 2])
    assert float(got) == pytest.approx(math.sqrt(math.fsum(sq)), rel=1e-13, abs=0.0)
