"""The wide norm's CUDA source itself, compiled for the host and run under the GPU
driver (``fastclip/_gpu/_wide.py``), without a GPU.

``wide_kernels.cu``, appended to ``kernels.cu`` as the GPU route compiles it, is
compiled by the host C++ compiler after the shim of ``tests/_host_cuda.py`` (every
CUDA thread of a block a host thread, ``__syncthreads`` a barrier,
``__shfl_down_sync`` an exchange within a warp, ``__half`` as ``_Float16``,
bfloat16 the upper half of a float32).  The driver's launches go to that library
through ctypes, with NumPy memory as device memory (as in
``test_gpu_wide_emulated.py``).
So the kernel text that ships -- the gated modes, the finish stages, the
warp-shuffle tree, the vector loads -- runs here against ``math.fsum``, and
against the Python twin (tests/_gpu_wide_twin.py), bit for bit (both round
every operation; ``-ffp-contract=off`` keeps the compiler from fusing
``acc + a * a``, which nvcc may do on the device).

Skips, with the reason, where no C++ compiler with C++20 ``<barrier>`` and
``_Float16`` (GCC 12, Clang 15) is on the PATH.
"""

from __future__ import annotations

import math
from typing import Any

import _gpu_wide_twin as twin
import _host_cuda as hc
import numpy as np
import pytest

from fastclip import _gpu as gpu
from fastclip._gpu import _modules, _tables

#: the instantiations the wide driver launches here (its finish: float64 norms)
KERNELS = {
    "fastclip_partial_pow_sum_wide": ("__half", "__nv_bfloat16", "float", "double"),
    "fastclip_finish_wide": ("double",),
}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> hc.Kernels:
    return hc.build(tmp_path_factory.mktemp("cuda_host"), "wide", _modules.source("wide"), KERNELS)


@pytest.fixture
def compiled(library: hc.Kernels, monkeypatch: pytest.MonkeyPatch) -> hc.Kernels:
    hc.use(
        monkeypatch,
        library,
        GPU_CHUNK=100,
        GPU_BLOCK=64,  # two warps: the cross-warp step runs
        GPU_FINISH_BLOCK=64,
        GPU_MAX_BLOCKS=3,  # grid-stride loops over the chunks
    )
    return library


def _run(arrays: list[np.ndarray], ord: float) -> float:
    code, p = twin.ORDS[ord]
    out = gpu.norm64(twin.HostLib, arrays, code, p, None, True)
    assert out.dtype == np.float64 and out.shape == ()
    return float(out)


def _twin(arrays: list[np.ndarray], ord: float, monkeypatch: pytest.MonkeyPatch) -> float:
    with monkeypatch.context() as m:
        m.setattr(_modules, "kernel", lambda feature, device, name, targ: twin.emulate(name, targ))
        _tables.TABLES.clear()
        return _run(arrays, ord)


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
@pytest.mark.parametrize("dtype", twin.DTYPES)
def test_the_cuda_source_gives_the_exact_norm_and_the_twins_bits(
    compiled: Any, dtype: str, ord: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = [twin.data(n, dtype, seed) for seed, n in enumerate((1003, 0, 5, 64, 257))]
    got = _run(arrays, ord)
    assert got == pytest.approx(twin.exact(arrays, ord), rel=1e-14, abs=0.0)
    assert got == _twin(arrays, ord, monkeypatch)  # same order, same roundings


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
def test_the_cuda_source_on_mixed_dtypes_zeros_and_splits(compiled: Any, ord: float) -> None:
    mixed = [twin.dyadic(n, d, i) for i, (d, n) in enumerate(zip(twin.DTYPES, (900, 7, 333, 64)))]
    assert _run(mixed, ord) == twin.exact(mixed, ord)  # exact sums: exactly rounded
    whole = twin.dyadic(2000, "bfloat16", 1)
    assert _run(np.split(whole, [1, 99, 1001]), ord) == _run([whole], ord)
    zeros = [np.zeros(130, np.float32), np.zeros(0, np.float64)]
    assert _run(zeros, ord) == 0.0
    assert _run([np.zeros(0, np.float32)], ord) == 0.0


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3])
def test_the_cuda_source_propagates_nan_and_inf(compiled: Any, ord: float) -> None:
    x = twin.data(450, "float32", 7)
    x[123] = np.nan
    assert math.isnan(_run([twin.data(9, "float16", 8), x], ord))
    x[123] = np.inf
    assert _run([twin.data(9, "float16", 8), x], ord) == math.inf


def test_the_cuda_source_rescales_out_of_range_power_sums(compiled: Any) -> None:
    big, tiny = np.array([1e200, 1e200, -1e200]), np.array([1e-310, 2e-310])
    assert _run([big], 2) == pytest.approx(math.sqrt(3.0) * 1e200, rel=1e-15)
    assert _run([tiny], 2) == pytest.approx(math.sqrt(5.0) * 1e-310, rel=1e-6)
    assert _run([big, tiny], 3) == pytest.approx(3.0 ** (1 / 3) * 1e200, rel=1e-14)
    near_max = np.full(5, 3e38, np.float32)
    assert _run([near_max], 3) == pytest.approx(5.0 ** (1 / 3) * float(near_max[0]), rel=1e-14)
