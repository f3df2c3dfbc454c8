"""fastclip's CUDA sources compiled for the host, for the host-compiled tests
(``tests/gpu/emulated/test_gpu_*_host_compiled.py``), without a GPU.

A ``.cu`` text is compiled by the host C++ compiler after a small shim: every CUDA
thread of a block is a host thread, ``__syncthreads`` a block-wide barrier,
``__shfl_down_sync`` an exchange between a warp's threads (a barrier per warp: only
warp 0 runs ``block_reduce``'s second shuffle), ``__shared__`` a static array (blocks
run one after another, row ``blockIdx.y`` by row), ``__half`` is ``_Float16`` and
bfloat16 the upper half of a float32.  The correctly rounded intrinsics of
``optim_kernels.cu`` (``__fmul_rn``, ``__fmaf_rn``, ...) are the host's IEEE operations
and ``std::fma``; ``-ffp-contract=off`` keeps the compiler from fusing ``acc + a * a``
(which nvcc may do on the device) or any other product and sum.

``build`` adds an ``extern "C"`` entry point per template instantiation, its parameters
read from the ``.cu`` (a changed signature changes the entry points with it), and
returns each as the driver calls a kernel: ``launch(grid, block, args)``, with NumPy
or torch CPU memory as device memory.  ``use`` sends the drivers' launches there.

``build`` skips, with the reason, where no C++ compiler with C++20 ``<barrier>`` and
``_Float16`` (GCC 12, Clang 15) is on the PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

from fastclip import _config as cfg
from fastclip._gpu import _adapters, _modules, _tables

CXX = shutil.which("g++") or shutil.which("c++")
FLAGS = ("-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread")
#: the ctypes kinds of the kernels' parameters: p pointer, q int64, i int, d double
CTYPE = {"p": ctypes.c_void_p, "q": ctypes.c_int64, "i": ctypes.c_int, "d": ctypes.c_double}

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
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
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
template <typename F> void launch2(int gx, int gy, int block, F body) {
    gridDim.x = gx;
    gridDim.y = gy;
    blockDim.x = block;
    for (int by = 0; by < gy; ++by)
        for (int bx = 0; bx < gx; ++bx) {
            std::barrier<> bar(block);
            g_block = &bar;
            g_warps.clear();
            for (int w = 0; w < (block + 31) / 32; ++w)
                g_warps.emplace_back(new std::barrier<>(std::min(32, block - 32 * w)));
            std::vector<std::thread> threads;
            for (int t = 0; t < block; ++t)
                threads.emplace_back([=] {
                    threadIdx.x = t;
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    body();
                });
            for (auto& th : threads) th.join();
        }
}
"""

#: (kernel name, template argument) -> launch(grid, block, args)
Key = tuple[str, str]


class Kernels(dict[Key, Callable[..., None]]):
    """The compiled instantiations; ``lib`` is the loaded library (for its globals)."""

    lib: ctypes.CDLL


def _kind(ctype: str) -> str:
    if "*" in ctype:
        return "p"
    return {"i64": "q", "int": "i", "double": "d"}[ctype]


def parameter_types(source: str, name: str) -> list[str]:
    """The C++ types of kernel ``name``'s parameters, as ``source`` declares them."""
    match = re.search(rf"__global__ void {name}\((.*?)\)\s*{{", source, re.S)
    assert match is not None, name
    return [" ".join(p.split()).rsplit(" ", 1)[0] for p in match.group(1).split(",")]


def symbol(name: str, targ: str) -> str:
    """The entry point of ``name<targ>``."""
    return f"{name}_{targ.strip('_')}"


def entries(source: str, kernels: Mapping[str, Iterable[str]]) -> tuple[str, dict[Key, str]]:
    """extern "C" wrappers launching ``name<targ>`` for each kernel and its template
    arguments (T, the element type, or N, the norm type): (their source, (name, targ)
    -> the ctypes kinds of the kernel's parameters)."""
    lines, kinds = [], {}
    for name, targs in kernels.items():
        types = parameter_types(source, name)
        for targ in targs:
            typed = [re.sub(r"\b(N|T)\b", targ, t) for t in types]
            args = ", ".join(f"{t} a{i}" for i, t in enumerate(typed))
            names = ", ".join(f"a{i}" for i in range(len(typed)))
            lines.append(
                f'extern "C" void {symbol(name, targ)}(int gx, int gy, int block, {args}) {{\n'
                f"    launch2(gx, gy, block, [=] {{ {name}<{targ}>({names}); }});\n}}"
            )
            kinds[(name, targ)] = "".join(_kind(t) for t in types)
    return "\n".join(lines) + "\n", kinds


@functools.cache
def _compiler_problem() -> str | None:
    """Why the shim cannot be compiled here (None: it can); probed once a session."""
    if CXX is None:
        return "no C++ compiler (g++ / c++) on PATH"
    with tempfile.TemporaryDirectory() as d:
        probe = pathlib.Path(d, "probe.cpp")
        probe.write_text("#include <barrier>\n_Float16 h = 1;\nstd::barrier<> b(1);\n")
        out = [CXX, *FLAGS, str(probe), "-o", str(probe.with_suffix(".so"))]
        result = subprocess.run(out, capture_output=True, text=True)
    if result.returncode != 0:
        return f"{CXX} lacks C++20 <barrier> or _Float16: {result.stderr[:300]}"
    return None


def require_compiler(what: str) -> None:
    """Skips the test, with the reason, where the shim cannot be compiled."""
    problem = _compiler_problem()
    if problem is not None:
        pytest.skip(f"{problem}: cannot build {what} for the host")


def build(
    directory: pathlib.Path | str,
    stem: str,
    source: str,
    kernels: Mapping[str, Iterable[str]],
    on_launch: Callable[[str, str, tuple[int, ...], tuple[int, ...], tuple[Any, ...]], None]
    | None = None,
) -> Kernels:
    """Compiles SHIM + ``source`` + the entry points of ``kernels`` (name -> template
    arguments) in ``directory``; each launch checks that the driver passes the kernel's
    parameters, calls ``on_launch(name, targ, grid, block, args)`` and runs the blocks."""
    require_compiler(stem)
    d = pathlib.Path(directory)
    code, kinds = entries(source, kernels)
    src = source.replace("#include <cuda_fp16.h>", "").replace("#include <cuda_bf16.h>", "")
    (d / f"{stem}.cpp").write_text(SHIM + src + code)
    result = subprocess.run(
        [CXX or "c++", *FLAGS, str(d / f"{stem}.cpp"), "-o", str(d / f"{stem}.so")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = Kernels()
    out.lib = ctypes.CDLL(str(d / f"{stem}.so"))
    for (name, targ), ks in kinds.items():
        fn = getattr(out.lib, symbol(name, targ))
        fn.argtypes = [ctypes.c_int] * 3 + [CTYPE[k] for k in ks]
        fn.restype = None
        out[(name, targ)] = _caller(fn, name, targ, ks, on_launch)
    return out


def _caller(fn: Any, name: str, targ: str, kinds: str, on_launch: Any) -> Callable[..., None]:
    def call(grid: tuple[int, ...], block: tuple[int], args: tuple[Any, ...]) -> None:
        assert len(args) == len(kinds), "the driver's arguments are the kernel's parameters"
        if on_launch is not None:
            on_launch(name, targ, tuple(grid), tuple(block), args)
        conv = [int(a) if k in "pqi" else float(a) for a, k in zip(args, kinds, strict=True)]
        gy = int(grid[1]) if len(grid) == 2 else 1
        fn(int(grid[0]), gy, int(block[0]), *conv)

    return call


def broken(feature: str, old: str, new: str) -> str:
    """``_modules.source(feature)`` with its one ``old`` replaced by ``new`` (a
    deliberate break, for the tests that show their checks catch it)."""
    source = _modules.source(feature)
    assert source.count(old) == 1, old
    return source.replace(old, new)


def use(mp: pytest.MonkeyPatch, kernel: Kernels | Callable[..., Any], **config: Any) -> None:
    """Sends the drivers' kernel lookups to ``kernel`` (compiled ``Kernels``, or a
    function of (feature, device, name, targ)), on the calling thread's "device", with
    the ``fastclip._config`` values in ``config``; the table cache starts empty."""
    if isinstance(kernel, Kernels):
        kernels = kernel
        mp.setattr(_modules, "kernel", lambda feature, device, name, targ: kernels[(name, targ)])
    else:
        mp.setattr(_modules, "kernel", kernel)
    mp.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    for key, value in config.items():
        mp.setattr(cfg, key, value)
    _tables.TABLES.clear()


_EMULATED = pathlib.Path(__file__).with_name("gpu") / "emulated"


def emulated_test_module(name: str) -> Any:
    """``tests/gpu/emulated/<name>.py`` (not on sys.path under --import-mode=importlib),
    loaded from its file once a session."""
    key = f"_host_cuda_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, _EMULATED / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]
