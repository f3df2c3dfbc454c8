"""The core CUDA source (``kernels.cu``) compiled for the host and run under the GPU
driver (``fastclip/_gpu/_core.py``, ``_tables.py``, ``_axes.py``), without a GPU.

The shim of ``test_gpu_wide_host_compiled.py`` (every CUDA thread of a block a host
thread, ``__syncthreads`` a barrier, ``__shfl_down_sync`` an exchange within a
warp, ``__half`` as ``_Float16``) is reused; the driver's launches of the
partial sums, ``fastclip_finish``, ``fastclip_scale``, the per-slice power sums,
``fastclip_axis_coefs`` and ``fastclip_axis_scale`` go to that library through
ctypes, with NumPy memory as device memory.  So the two-factor coefficient
(``coefficient_parts`` of ``fastclip/_formulas.py``, written again in CUDA) and
its ``(x * c) * c2`` runs here as it ships, checked bit for bit against the CPU
route's rule and result (``tests/_gpu_emulation.py: check_two_factor_cases``).

Skips, with the reason, where no C++ compiler with C++20 ``<barrier>`` and
``_Float16`` (GCC 12, Clang 15) is on the PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import math
import pathlib
import subprocess
from typing import Any

import _gpu_emulation
import numpy as np
import pytest

from fastclip import _config as cfg
from fastclip import _gpu as gpu
from fastclip._gpu import _adapters, _modules, _tables


def _wide_test_module() -> Any:
    # the shim lives in the wide norm's host-compiled test; tests/gpu/emulated is not
    # on sys.path under --import-mode=importlib, so it is loaded from its file
    path = pathlib.Path(__file__).with_name("test_gpu_wide_host_compiled.py")
    spec = importlib.util.spec_from_file_location("_fastclip_wide_host_compiled", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_WIDE = _wide_test_module()
CXX, SHIM, CTYPE = _WIDE.CXX, _WIDE.SHIM, _WIDE.CTYPE

#: kernel -> (its C++ parameter types, T the element / N the norm type; the
#: ctypes kinds: p pointer, q int64, i int, d double), in the .cu's order.
KERNELS: dict[str, tuple[str, ...]] = {
    "fastclip_partial_pow_sum": (
        "const u64*",
        "const i64*",
        "const i64*",
        "const i64*",
        "i64",
        "i64",
        "int",
        "double",
        "double*",
    ),
    "fastclip_finish": (
        "const double*",
        "i64",
        "int",
        "double",
        "double",
        "double",
        "int",
        "const double*",
        "N*",
        "double*",
    ),
    "fastclip_scale": (
        "const u64*",
        "const u64*",
        "const i64*",
        "const i64*",
        "const i64*",
        "i64",
        "i64",
        "const double*",
    ),
    "fastclip_tensor_norms": (
        "const double*",
        "const i64*",
        "i64",
        "i64",
        "const i64*",
        "int",
        "double",
        "N*",
    ),
    "fastclip_rows_pow_sum": ("const T*", "i64", "i64", "int", "double", "double*"),
    "fastclip_cols_pow_sum": ("const T*", "i64", "i64", "int", "double", "double*"),
    "fastclip_axis_coefs": (
        "const double*",
        "i64",
        "int",
        "double",
        "double",
        "double",
        "int",
        "N*",
        "double*",
    ),
    "fastclip_axis_scale": ("const T*", "T*", "i64", "i64", "i64", "const double*"),
}
NORM_KERNELS = {"fastclip_finish", "fastclip_tensor_norms", "fastclip_axis_coefs"}
ELEMENTS = ("float", "double", "__half")


def _kind(ctype: str) -> str:
    if "*" in ctype:
        return "p"
    return {"i64": "q", "int": "i", "double": "d"}[ctype]


def _entries() -> tuple[str, dict[tuple[str, str], tuple[str, str]]]:
    """extern "C" wrappers that launch each instantiation: (source, (name, targ) ->
    (symbol, ctypes kinds))."""
    lines, symbols = [], {}
    for name, params in KERNELS.items():
        for targ in ("float", "double") if name in NORM_KERNELS else ELEMENTS:
            typed = [p.replace("T*", f"{targ}*").replace("N*", f"{targ}*") for p in params]
            args = ", ".join(f"{t} a{i}" for i, t in enumerate(typed))
            names = ", ".join(f"a{i}" for i in range(len(typed)))
            symbol = f"{name}_{targ.strip('_')}"
            lines.append(
                f'extern "C" void {symbol}(int grid, int block, {args}) {{\n'
                f"    launch(grid, block, [=] {{ {name}<{targ}>({names}); }});\n}}"
            )
            symbols[(name, targ)] = (symbol, "".join(_kind(p) for p in params))
    return "\n".join(lines) + "\n", symbols


ENTRIES, SYMBOLS = _entries()


def _build(d: pathlib.Path, source: str) -> ctypes.CDLL:
    cmd = [CXX, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]
    (d / "probe.cpp").write_text("#include <barrier>\n_Float16 h = 1;\nstd::barrier<> b(1);\n")
    probe = subprocess.run(
        [*cmd, str(d / "probe.cpp"), "-o", str(d / "probe.so")], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"{CXX} lacks C++20 <barrier> or _Float16: {probe.stderr[:300]}")
    src = source.replace("#include <cuda_fp16.h>", "").replace("#include <cuda_bf16.h>", "")
    (d / "core.cpp").write_text(SHIM + src + ENTRIES)
    result = subprocess.run(
        [*cmd, str(d / "core.cpp"), "-o", str(d / "core.so")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lib = ctypes.CDLL(str(d / "core.so"))
    for symbol, kinds in SYMBOLS.values():
        getattr(lib, symbol).argtypes = [ctypes.c_int, ctypes.c_int] + [CTYPE[k] for k in kinds]
        getattr(lib, symbol).restype = None
    return lib


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    if CXX is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH to build kernels.cu for the host")
    return _build(tmp_path_factory.mktemp("cuda_core_host"), _modules.source("core"))


def _compiled(lib: ctypes.CDLL, name: str, targ: str) -> Any:
    symbol, kinds = SYMBOLS[(name, targ)]
    fn = getattr(lib, symbol)

    def call(grid: tuple[int], block: tuple[int], args: tuple[Any, ...]) -> None:
        assert len(args) == len(kinds), "the driver's arguments are the kernel's parameters"
        conv = [int(a) if k in "pqi" else float(a) for a, k in zip(args, kinds, strict=True)]
        fn(int(grid[0]), int(block[0]), *conv)

    return call


class HostLib(_gpu_emulation.HostLib):
    kind = staticmethod(
        lambda x: str(x.dtype) if str(x.dtype) in ("float16", "float32", "float64") else None
    )


def _use(library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        _modules, "kernel", lambda feature, device, name, targ: _compiled(library, name, targ)
    )
    monkeypatch.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    monkeypatch.setattr(cfg, "GPU_CHUNK", 2)  # several chunks per array
    monkeypatch.setattr(cfg, "GPU_BLOCK", 64)  # two warps: the cross-warp step runs
    monkeypatch.setattr(cfg, "GPU_FINISH_BLOCK", 64)
    monkeypatch.setattr(cfg, "GPU_MAX_BLOCKS", 3)  # grid-stride loops
    _tables.TABLES.clear()


@pytest.fixture
def compiled(library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> ctypes.CDLL:
    _use(library, monkeypatch)
    return library


@pytest.mark.parametrize("ord", list(_gpu_emulation.ORD_CODES))
def test_the_cuda_source_applies_two_factor_coefficients(compiled: Any, ord: float) -> None:
    """float64 [1e300, ...] clipped to 1e-300 with eps 0 is not 0, subnormal data
    normalised are not NaN/inf; rows needing two factors beside ordinary rows; in and
    out of place; global lists: as the CPU route, bit for bit."""
    _gpu_emulation.check_two_factor_cases(gpu, HostLib, ord)


def test_the_cuda_source_keeps_one_factor_callers(compiled: Any) -> None:
    """scale_ passes (factor, 1); ordinary clips (c2 = 1) multiply once, in float64
    rounded to float32 for float32 data and to float16 for float16 data."""
    x = np.array([3.0, -1e300, 5e-324, 7.0])
    want = x * 1e-300
    gpu.scale_(HostLib, [x], 1e-300)
    np.testing.assert_array_equal(x, want)
    for dtype in (np.float32, np.float16):
        y = np.array([1.5, -2.5, 3.0, 0.25, 6.0], dtype)
        gpu.scale_(HostLib, [y], np.asarray(0.3))
        want32 = (np.array([1.5, -2.5, 3.0, 0.25, 6.0]) * 0.3).astype(np.float32)
        np.testing.assert_array_equal(y, want32.astype(dtype))
        z = np.array([[3.0, 4.0], [0.3, 0.4]], dtype)
        out, norms = gpu.rescale(HostLib, z, 2, 2.0, (1,), 1.0, 0.0, "clip", False)
        c = np.minimum(1.0, 1.0 / np.asarray(norms, np.float64))[:, None]
        np.testing.assert_array_equal(
            out, (z.astype(np.float64) * c).astype(np.float32).astype(dtype)
        )


def test_the_cuda_source_two_factors_of_float32_data(compiled: Any) -> None:
    """float32 data clipped below 2**-1000 times its norm: 0 after the c2 pass, as the
    CPU route (the exact product is below float32's smallest subnormal)."""
    import fastclip

    x = np.array([1e30, -2e30, 4e29], np.float32)
    out, _ = gpu.rescale(HostLib, x, 1, 1.0, None, 1e-300, 0.0, "clip", False)
    np.testing.assert_array_equal(out, np.asarray(fastclip.clip_by_norm(x, 1e-300, ord=1, eps=0.0)))
    np.testing.assert_array_equal(out, np.zeros(3, np.float32))
    s = np.array([0.0, 1e-40, -3e-40], np.float32)  # float32 subnormals, normalised
    out, _ = gpu.rescale(HostLib, s, 0, math.inf, None, 1.0, 0.0, "normalize", False)
    np.testing.assert_array_equal(out, np.asarray(fastclip.normalize(s, ord=math.inf, eps=0.0)))
    assert np.all(np.isfinite(out)) and out[2] == -1.0


def test_a_broken_c2_in_the_cuda_source_is_caught(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks above fail when the kernel's c2 is dropped (c2 forced to 1)."""
    if CXX is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH to build kernels.cu for the host")
    source = _modules.source("core")
    broken = source.replace("return (c2 != 1.0) ?", "return false ?")
    assert broken != source
    _use(_build(pathlib.Path(str(tmp_path)), broken), monkeypatch)
    with pytest.raises(AssertionError):
        _gpu_emulation.check_two_factor_cases(gpu, HostLib, 1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_the_cuda_source_max_norm_is_the_max(compiled: Any, dtype: Any) -> None:
    """ord inf (ord_code 0, p = inf): the max |x|, whole, per row and per column; the
    kernels once took pow(|x|, inf) for it, inf for any |x| > 1."""
    import reference as ref

    x = np.array([[0.5, -2.0, 1.5], [0.25, 0.125, -0.75]], dtype)
    got = gpu.global_norm(HostLib, [x, np.array([-1.75], dtype)], 0, math.inf)
    assert float(got) == 2.0
    for axis in (1, 0):
        norms = gpu.norm(HostLib, x, 0, math.inf, (axis,), False)
        np.testing.assert_array_equal(np.asarray(norms), ref.norm(x, math.inf, axis=axis))


@pytest.mark.parametrize("scale", [1e-23, 1e-20, 1e-17])
def test_the_cuda_source_sums_tiny_float32_squares_in_float64(compiled: Any, scale: float) -> None:
    """float32 data whose squares are float32 subnormals or 0 (|x| ~ 1e-23 .. 1e-17):
    a thread's float32 sum of squares below 1e-30 is redone in float64, as on the CPU
    route; without it the global norm of 41 values of ~1e-23 was 0."""
    import reference as ref

    import fastclip

    rng = np.random.default_rng(3)
    x = (rng.standard_normal(41) * scale).astype(np.float32)
    y = (rng.standard_normal((3, 7)) * scale).astype(np.float32)
    got = float(gpu.global_norm(HostLib, [x, y], 2, 2.0))
    want = float(ref.global_norm([x.astype(np.float64), y.astype(np.float64)]))
    assert got == pytest.approx(want, rel=1e-6)
    assert got == pytest.approx(float(fastclip.global_norm([x, y])), rel=1e-6)
    norms = np.asarray(gpu.norm(HostLib, y, 2, 2.0, (1,), False), np.float64)
    np.testing.assert_allclose(norms, ref.norm(y.astype(np.float64), 2, axis=1), rtol=1e-6)


def test_a_missing_underflow_redo_in_the_cuda_source_is_caught(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above fails when chunk_pow_sum redoes only on overflow."""
    if CXX is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH to build kernels.cu for the host")
    source = _modules.source("core")
    broken = source.replace(
        "if ((ord_code != 0 && !isfinite(acc)) || tiny)", "if (ord_code != 0 && !isfinite(acc))"
    )
    assert broken != source
    _use(_build(pathlib.Path(str(tmp_path)), broken), monkeypatch)
    with pytest.raises(AssertionError):
        test_the_cuda_source_sums_tiny_float32_squares_in_float64(None, 1e-23)
