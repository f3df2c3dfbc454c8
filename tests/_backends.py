"""The backend matrix: which array libraries the suite runs on, and how to talk to them.

Modelled on array-api-extra's ``Backend`` enum: each member builds arrays from
float64 NumPy data in its own type and dtype, converts results back to
float64 NumPy for comparison with ``reference``, and checks that a result has
the namespace, dtype, shape and device it should.  GPU members skip with a
reason unless a device is usable (never on "the package imports").
"""

from __future__ import annotations

import contextlib
import enum
import functools
import math
from typing import Any

import numpy as np
import pytest

FLOAT16 = ("float16", "bfloat16")
REAL_FLOATS = ("float16", "bfloat16", "float32", "float64")
COMPLEX = ("complex64", "complex128")
#: The norm orders every operation runs on: the three special cases and a general p.
ORDS = (1, 2, math.inf, 3)
#: Bounds for integer and bool clip_by_value that saturate at the dtype's range.
SATURATING_INT_BOUNDS = (
    (-math.inf, math.inf),
    (None, math.inf),
    (-math.inf, None),
    (math.inf, None),
    (None, -math.inf),
    (-1e30, 1e30),
    (1e30, None),
    (None, -1e30),
    (-2.5, 1e30),
    (-1e30, 0.5),
    (1e300, math.inf),
)
#: Dtypes with no kernels: byte-swapped floats and ints, long double, complex long double.
UNSUPPORTED_DTYPES = (">f4", ">f8", ">f2", np.longdouble, np.clongdouble, ">i4")
#: Orders below 1 and between 1 and 2 (the general-p kernels' other branches).
FRACTIONAL_ORDS = (0.5, 1.5)

#: Relative tolerance on element values and norms, per dtype (see ``rtol``).
_RTOL = {
    "float64": 1e-12,
    "complex128": 1e-12,
    "float32": 1e-6,
    "complex64": 1e-6,
    "float16": 1e-2,
    "bfloat16": 1e-2,
}


@functools.cache
def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@functools.cache
def _cupy_available() -> bool:
    try:
        import cupy
    except ImportError:
        return False
    return bool(cupy.is_available())


class Backend(enum.Enum):
    NUMPY = "numpy"
    NUMPY_READONLY = "numpy_readonly"
    TORCH = "torch"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH_CUDA = "torch_cuda"
    CUPY = "cupy"

    def __str__(self) -> str:
        return self.value

    # ---------------------------------------------------------------- facts

    @property
    def is_torch(self) -> bool:
        return self in (Backend.TORCH, Backend.TORCH_CUDA)

    @property
    def is_numpy(self) -> bool:
        return self in (Backend.NUMPY, Backend.NUMPY_READONLY)

    @property
    def writeable(self) -> bool:
        """Whether in-place functions may modify arrays built by this backend."""
        return self is not Backend.NUMPY_READONLY

    @property
    def float_dtypes(self) -> tuple[str, ...]:
        if self.is_torch:
            return REAL_FLOATS
        if self is Backend.ARRAY_API_STRICT:
            return ("float32", "float64")  # array-api-strict has no float16
        return ("float16", "float32", "float64")  # NumPy and CuPy: no bfloat16

    def skip_reason(self) -> str | None:
        if self is Backend.TORCH_CUDA and not _cuda_available():
            return "torch.cuda.is_available() is False: no CUDA device for the TORCH_CUDA backend"
        if self is Backend.CUPY and not _cupy_available():
            return "cupy is not installed or cupy.is_available() is False: no CUDA device"
        return None

    # ----------------------------------------------------------- conversion

    def module(self) -> Any:
        if self.is_numpy:
            return np
        if self.is_torch:
            import torch

            return torch
        if self is Backend.ARRAY_API_STRICT:
            import array_api_strict

            return array_api_strict
        import cupy

        return cupy

    def dtype(self, name: str) -> Any:
        return getattr(self.module(), name)

    def asarray(self, data: Any, dtype: str = "float64") -> Any:
        """``data`` (NumPy, usually float64) converted to this backend and ``dtype``."""
        data = np.asarray(data)
        mod = self.module()
        if self.is_numpy:
            out = np.array(data, dtype=dtype)
            if self is Backend.NUMPY_READONLY:
                out.flags.writeable = False
            return out
        if self.is_torch:
            device = "cuda" if self is Backend.TORCH_CUDA else "cpu"
            return mod.tensor(data, dtype=getattr(mod, dtype), device=device)
        if self is Backend.ARRAY_API_STRICT:
            return mod.asarray(data.astype(dtype) if dtype != "bool" else data.astype(bool))
        return mod.asarray(data, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        """A result as NumPy: float64 (complex128 for complex), integers and bools as they are."""
        if self.is_torch:
            import torch

            t = x.detach().cpu()
            if t.dtype.is_complex:
                t = t.to(torch.complex128)
            elif t.dtype.is_floating_point:
                t = t.to(torch.float64)
            return t.numpy().copy()
        if self is Backend.CUPY:
            import cupy

            a = cupy.asnumpy(x)
        elif self is Backend.ARRAY_API_STRICT:
            a = np.from_dlpack(x).copy()
        else:
            a = np.array(x, copy=True)
        if a.dtype.kind == "c":
            return a.astype(np.complex128)
        if a.dtype.kind == "f":
            return a.astype(np.float64)
        return a

    def round_to(self, values: np.ndarray, dtype: str) -> np.ndarray:
        """float64 values rounded to ``dtype`` and back (for 16-bit comparisons)."""
        if dtype == "bfloat16":
            import torch

            t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
            return t.to(torch.bfloat16).to(torch.float64).numpy()
        return np.asarray(values).astype(dtype).astype(np.result_type(dtype, np.float64))

    # ------------------------------------------------------------ assertions

    def assert_array(self, result: Any, like: Any, dtype: str, shape: tuple[int, ...]) -> None:
        """``result`` is an array of this backend, of ``dtype`` and ``shape``, on ``like``'s device."""
        if self.is_numpy:
            assert type(result) is np.ndarray, type(result)
        elif self.is_torch:
            import torch

            assert isinstance(result, torch.Tensor), type(result)
            assert result.device == like.device, (result.device, like.device)
        elif self is Backend.ARRAY_API_STRICT:
            import array_api_strict

            assert isinstance(result, array_api_strict._array_object.Array), type(result)
            assert result.device == like.device, (result.device, like.device)
        else:
            import cupy

            assert isinstance(result, cupy.ndarray), type(result)
            assert result.device == like.device
        assert result.dtype == self.dtype(dtype), (result.dtype, dtype)
        assert tuple(result.shape) == tuple(shape), (tuple(result.shape), shape)


def norm_dtype(dtype: str) -> str:
    """The dtype of norms of ``dtype`` data: float64 for 64-bit, else float32."""
    return "float64" if dtype in ("float64", "complex128") else "float32"


def rtol(dtype: str) -> float:
    return _RTOL[dtype]


def assert_close(got: np.ndarray, expected: np.ndarray, dtype: str, atol: float = 0.0) -> None:
    """Element-wise comparison at ``dtype``'s tolerance; NaN must match NaN, inf must match inf."""
    got = np.asarray(got)
    expected = np.asarray(expected)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=rtol(dtype), atol=atol, equal_nan=True)


def params(backends: Any = None, dtypes: Any = REAL_FLOATS) -> list[Any]:
    """``pytest.param(backend, dtype)`` for every backend and every dtype it supports.

    ``dtypes`` entries a backend lacks (bfloat16 outside torch, float16 on
    array-api-strict) are left out rather than skipped.  GPU backends carry a
    skip mark with the reason when no device is usable.
    """
    out = []
    for b in backends or list(Backend):
        supported = b.float_dtypes + COMPLEX + ("int32", "int64", "bool")
        for d in dtypes:
            if d not in supported:
                continue
            marks = [pytest.mark.skip(reason=r)] if (r := b.skip_reason()) else []
            out.append(pytest.param(b, d, id=f"{b}-{d}", marks=marks))
    return out


def backend_params(backends: Any = None) -> list[Any]:
    """``pytest.param(backend)`` for each backend, GPU ones skipping with a reason."""
    out = []
    for b in backends or list(Backend):
        marks = [pytest.mark.skip(reason=r)] if (r := b.skip_reason()) else []
        out.append(pytest.param(b, id=str(b), marks=marks))
    return out


WRITEABLE = [
    Backend.NUMPY,
    Backend.TORCH,
    Backend.ARRAY_API_STRICT,
    Backend.TORCH_CUDA,
    Backend.CUPY,
]
CPU = [Backend.NUMPY, Backend.NUMPY_READONLY, Backend.TORCH, Backend.ARRAY_API_STRICT]


def sample(shape: Any, seed: int = 0, kind: str = "real", scale: float = 1.0) -> np.ndarray:
    """Reproducible float64 (or complex128) normal data."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) * scale
    if kind == "complex":
        values = values + 1j * rng.standard_normal(shape) * scale
    return values


def require_gpu_module() -> Any:
    """At the top of a GPU-only test module: skip the whole module with the reason
    unless torch sees a CUDA device and fastclip's GPU route can run; returns torch."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False: no CUDA device", allow_module_level=True)
    import fastclip

    try:
        fastclip._dispatch.check_gpu_available()
    except fastclip.GPUUnavailableError as exc:
        pytest.skip(
            f"CUDA device present but the GPU route cannot run: {exc}", allow_module_level=True
        )
    return torch


def to_f64(x: Any) -> np.ndarray:
    """Any CPU array (NumPy, torch, array-api-strict) or number as float64 NumPy (a copy)."""
    if hasattr(x, "detach"):
        import torch

        return x.detach().to(torch.float64).numpy()
    if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
        return np.from_dlpack(x).astype(np.float64)
    return np.array(x, dtype=np.float64)


def _element_bytes(a: Any) -> bytes:
    if hasattr(a, "detach"):
        import torch

        t = a.detach().cpu().contiguous().reshape(-1)
        return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return np.array(a, copy=True).tobytes()


@contextlib.contextmanager
def unchanged(*arrays: Any) -> Any:
    """Assert, after the block, that every array holds exactly its old bytes
    (NumPy arrays and torch tensors; NaN payloads and signed zeros included)."""
    snapshots = [(a, _element_bytes(a)) for a in arrays]
    yield
    for a, before in snapshots:
        assert _element_bytes(a) == before, "an input array was modified"


def clipper_state(clipper: Any) -> str:
    """Everything a call to a fastclip.adaptive clipper may change, as one comparable
    string (NaN == NaN in JSON)."""
    import json

    return json.dumps(
        [
            clipper.state_dict(),
            clipper.step,
            clipper.last_total_norm,
            clipper.last_threshold,
            clipper.last_step_skipped,
        ],
        sort_keys=True,
    )


@contextlib.contextmanager
def no_host_sync() -> Any:
    """Inside: any device-to-host synchronisation raises (torch's sync debug mode)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
