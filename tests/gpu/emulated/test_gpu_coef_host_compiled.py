"""The core CUDA source (``kernels.cu``) compiled for the host and run under the GPU
driver (``fastclip/_gpu/_core.py``, ``_tables.py``, ``_axes.py``), without a GPU.

The shim of ``tests/_host_cuda.py`` (every CUDA thread of a block a host thread,
``__syncthreads`` a barrier, ``__shfl_down_sync`` an exchange within a warp,
``__half`` as ``_Float16``) is used; the driver's launches of the
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

import math
import pathlib
from typing import Any

import _gpu_emulation
import _host_cuda as hc
import numpy as np
import pytest

from fastclip import _gpu as gpu
from fastclip._gpu import _modules

#: the kernels the core driver launches here -> their template arguments
ELEMENTS = ("float", "double", "__half")
KERNELS = dict.fromkeys(
    (
        "fastclip_partial_pow_sum",
        "fastclip_scale",
        "fastclip_rows_pow_sum",
        "fastclip_cols_pow_sum",
        "fastclip_axis_scale",
    ),
    ELEMENTS,
)
KERNELS.update(
    dict.fromkeys(
        ("fastclip_finish", "fastclip_tensor_norms", "fastclip_axis_coefs"), ("float", "double")
    )
)


def _build(d: pathlib.Path, source: str) -> hc.Kernels:
    return hc.build(d, "core", source, KERNELS)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> hc.Kernels:
    return _build(tmp_path_factory.mktemp("cuda_core_host"), _modules.source("core"))


class HostLib(_gpu_emulation.HostLib):
    kind = staticmethod(
        lambda x: str(x.dtype) if str(x.dtype) in ("float16", "float32", "float64") else None
    )


def _use(library: hc.Kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    hc.use(
        monkeypatch,
        library,
        GPU_CHUNK=2,  # several chunks per array
        GPU_BLOCK=64,  # two warps: the cross-warp step runs
        GPU_FINISH_BLOCK=64,
        GPU_MAX_BLOCKS=3,  # grid-stride loops
    )


@pytest.fixture
def compiled(library: hc.Kernels, monkeypatch: pytest.MonkeyPatch) -> hc.Kernels:
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
    broken = hc.broken("core", "return (c2 != 1.0) ?", "return false ?")
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
    broken = hc.broken(
        "core",
        "if ((ord_code != 0 && !isfinite(acc)) || tiny)",
        "if (ord_code != 0 && !isfinite(acc))",
    )
    _use(_build(pathlib.Path(str(tmp_path)), broken), monkeypatch)
    with pytest.raises(AssertionError):
        test_the_cuda_source_sums_tiny_float32_squares_in_float64(None, 1e-23)
