"""The wide norm's CUDA source itself, compiled for the host and run under the GPU
driver (``fastclip/_gpu/_wide.py``), without a GPU.

``wide_kernels.cu``, appended to ``kernels.cu`` as the GPU route compiles it, is
compiled by the host C++ compiler after a small shim: every CUDA thread of a block is a host thread, ``__syncthreads`` a block-wide barrier,
``__shfl_down_sync`` an exchange between a warp's threads (a barrier per warp:
only warp 0 runs ``block_reduce``'s second shuffle), ``__shared__`` a static
array (blocks run one after another), ``__half`` is ``_Float16`` and bfloat16 the
upper half of a float32.  The driver's launches go to that library through
ctypes, with NumPy memory as device memory (as in ``test_gpu_wide_emulated.py``).
So the kernel text that ships -- the gated modes, the finish stages, the
warp-shuffle tree, the vector loads -- runs here against ``math.fsum``, and
against the Python twin (tests/_gpu_wide_twin.py), bit for bit (both round
every operation; ``-ffp-contract=off`` keeps the compiler from fusing
``acc + a * a``, which nvcc may do on the device).

Skips, with the reason, where no C++ compiler with C++20 ``<barrier>`` and
``_Float16`` (GCC 12, Clang 15) is on the PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import shutil
import subprocess
from typing import Any

import _gpu_wide_twin as twin
import numpy as np
import pytest

from fastclip import _config as cfg
from fastclip import _gpu as gpu
from fastclip._gpu import _adapters, _modules, _tables

CXX = shutil.which("g++") or shutil.which("c++")

SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
using std::fabs; using std::isfinite; using std::max; using std::min; using std::pow;
#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
struct __half { _Float16 v; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    return __nv_bfloat16{(uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
static std::barrier<>* g_block;
static std::vector<std::unique_ptr<std::barrier<>>> g_warps;
static double g_exchange[1024];
inline void __syncthreads() { g_block->arrive_and_wait(); }
inline double __shfl_down_sync(unsigned, double v, int offset) {
    const unsigned t = threadIdx.x;
    std::barrier<>& warp = *g_warps[t >> 5];
    g_exchange[t] = v;
    warp.arrive_and_wait();
    const unsigned src = t + offset;
    const double r = ((t & 31) + offset < 32 && src < blockDim.x) ? g_exchange[src] : v;
    warp.arrive_and_wait();
    return r;
}
template <typename F> void launch(int grid, int block, F body) {
    gridDim.x = grid;
    blockDim.x = block;
    for (int b = 0; b < grid; ++b) {
        std::barrier<> bar(block);
        g_block = &bar;
        g_warps.clear();
        for (int w = 0; w < (block + 31) / 32; ++w)
            g_warps.emplace_back(new std::barrier<>(std::min(32, block - 32 * w)));
        std::vector<std::thread> threads;
        for (int t = 0; t < block; ++t)
            threads.emplace_back([=] { threadIdx.x = t; blockIdx.x = b; body(); });
        for (auto& th : threads) th.join();
    }
}
"""

ENTRIES = r"""
#define PARTIAL(NAME, T)                                                              \
extern "C" void NAME(int grid, int block, const u64* ptrs, const i64* sizes,          \
                     const i64* ct, const i64* cs, i64 nc, i64 chunk, int ord_code,   \
                     double p, int mode, const double* state, double* partials) {     \
    launch(grid, block, [=] {                                                         \
        fastclip_partial_pow_sum_wide<T>(ptrs, sizes, ct, cs, nc, chunk, ord_code, p, \
                                         mode, state, partials);                      \
    });                                                                               \
}
PARTIAL(partial_half, __half)
PARTIAL(partial_bf16, __nv_bfloat16)
PARTIAL(partial_float, float)
PARTIAL(partial_double, double)
extern "C" void finish_double(int grid, int block, const double* partials, i64 n,
                              int ord_code, double p, int stage, double lo, double hi,
                              double* state, double* norm_out) {
    launch(grid, block, [=] {
        fastclip_finish_wide<double>(partials, n, ord_code, p, stage, lo, hi, state, norm_out);
    });
}
"""

SYMBOLS = {
    ("fastclip_partial_pow_sum_wide", "__half"): "partial_half",
    ("fastclip_partial_pow_sum_wide", "__nv_bfloat16"): "partial_bf16",
    ("fastclip_partial_pow_sum_wide", "float"): "partial_float",
    ("fastclip_partial_pow_sum_wide", "double"): "partial_double",
    ("fastclip_finish_wide", "double"): "finish_double",
}
# the kernels' parameters after (grid, block): p pointer, q int64, i int, d double
SIGNATURES = {"partial": "ppppqqidipp", "finish": "pqididdpp"}
CTYPE = {"p": ctypes.c_void_p, "q": ctypes.c_int64, "i": ctypes.c_int, "d": ctypes.c_double}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    if CXX is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH to build wide_kernels.cu for the host")
    d = tmp_path_factory.mktemp("cuda_host")
    cmd = [CXX, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]
    # the shim needs C++20's <barrier> and _Float16 (GCC 12, Clang 15): probe them first
    (d / "probe.cpp").write_text("#include <barrier>\n_Float16 h = 1;\nstd::barrier<> b(1);\n")
    probe = subprocess.run(
        [*cmd, str(d / "probe.cpp"), "-o", str(d / "probe.so")], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"{CXX} lacks C++20 <barrier> or _Float16: {probe.stderr[:300]}")
    src = _modules.source("wide").replace("#include <cuda_fp16.h>", "")
    src = src.replace("#include <cuda_bf16.h>", "")
    (d / "wide.cpp").write_text(SHIM + src + ENTRIES)
    result = subprocess.run(
        [*cmd, str(d / "wide.cpp"), "-o", str(d / "wide.so")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lib = ctypes.CDLL(str(d / "wide.so"))
    for (name, _), symbol in SYMBOLS.items():
        kinds = SIGNATURES["partial" if "partial" in name else "finish"]
        getattr(lib, symbol).argtypes = [ctypes.c_int, ctypes.c_int] + [CTYPE[k] for k in kinds]
        getattr(lib, symbol).restype = None
    return lib


def _compiled(lib: ctypes.CDLL, name: str, targ: str) -> Any:
    fn = getattr(lib, SYMBOLS[(name, targ)])
    kinds = SIGNATURES["partial" if "partial" in name else "finish"]

    def call(grid: tuple[int], block: tuple[int], args: tuple[Any, ...]) -> None:
        assert len(args) == len(kinds), "the driver's arguments are the kernel's parameters"
        conv = [int(a) if k in "pqi" else float(a) for a, k in zip(args, kinds, strict=True)]
        fn(int(grid[0]), int(block[0]), *conv)

    return call


@pytest.fixture
def compiled(library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> ctypes.CDLL:
    monkeypatch.setattr(
        _modules, "kernel", lambda feature, device, name, targ: _compiled(library, name, targ)
    )
    monkeypatch.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    monkeypatch.setattr(cfg, "GPU_CHUNK", 100)
    monkeypatch.setattr(cfg, "GPU_BLOCK", 64)  # two warps: the cross-warp step runs
    monkeypatch.setattr(cfg, "GPU_FINISH_BLOCK", 64)
    monkeypatch.setattr(cfg, "GPU_MAX_BLOCKS", 3)  # grid-stride loops over the chunks
    _tables.TABLES.clear()
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
