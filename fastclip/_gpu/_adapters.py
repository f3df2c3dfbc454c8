"""Adapters for device arrays: CuPy arrays and torch CUDA tensors, and the
device and stream context every launch runs in (:func:`on_device`).

Kernels receive raw device pointers, so both libraries are used zero-copy; each
adapter allocates outputs and scratch with its own library's allocator (so
memory is stream-ordered with the caller's work) and says on which stream to
launch: CuPy's current stream for CuPy arrays, torch's *current* stream for
CUDA tensors (also under ``torch.cuda.stream(...)`` and CUDA graph capture).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import numpy as np

__all__ = ["KINDS", "CupyAdapter", "TorchCudaAdapter", "check_kind", "lib_for", "on_device"]

KINDS = ("float16", "bfloat16", "float32", "float64")


def _cupy() -> Any:
    import cupy

    return cupy


class CupyAdapter:
    name = "cupy"

    @staticmethod
    def kind(x: Any) -> str | None:
        name = str(x.dtype)
        return name if name in KINDS else None

    @staticmethod
    def is_float(x: Any) -> bool:
        return x.dtype.kind in "fc"

    @staticmethod
    def device_id(x: Any) -> int:
        return int(x.device.id)

    @staticmethod
    def ptr(x: Any) -> int:
        return int(x.data.ptr)

    @staticmethod
    def numel(x: Any) -> int:
        return int(x.size)

    @staticmethod
    def contiguous(x: Any) -> bool:
        return bool(x.flags.c_contiguous)

    @staticmethod
    def strides(x: Any) -> tuple[int, ...]:
        return tuple(x.strides)

    @staticmethod
    def as_contiguous(x: Any) -> Any:
        return _cupy().ascontiguousarray(x)

    @staticmethod
    def write_back(x: Any, values: Any) -> None:
        x[...] = values

    @staticmethod
    def permute(x: Any, perm: tuple[int, ...]) -> Any:
        return x.transpose(perm)

    @staticmethod
    def reshape(x: Any, shape: tuple[int, ...]) -> Any:
        return x.reshape(shape)

    @staticmethod
    def empty(shape: tuple[int, ...], kind: str, like: Any) -> Any:
        return _cupy().empty(shape, dtype=np.dtype(kind))

    @staticmethod
    def empty_like(x: Any) -> Any:
        return _cupy().empty(x.shape, dtype=x.dtype)

    @staticmethod
    def full_f64(value: float, like: Any) -> Any:
        return _cupy().full((), value, dtype=np.float64)

    @staticmethod
    def to_f64(value: Any) -> Any:
        return value.astype(np.float64).reshape(())

    @staticmethod
    def stream(x: Any) -> Any:
        return contextlib.nullcontext()  # CuPy's current stream

    @staticmethod
    def stream_id(x: Any) -> int:
        return int(_cupy().cuda.get_current_stream().ptr)

    @staticmethod
    def upload(buf: np.ndarray, like: Any) -> tuple[Any, Any]:
        """Async host-to-device copy from pinned memory: (device array, pinned buffer)."""
        cupy = _cupy()
        import cupyx

        pinned = cupyx.empty_pinned(buf.shape, buf.dtype)
        pinned[...] = buf
        dev = cupy.empty(buf.shape, buf.dtype)
        dev.set(pinned, stream=cupy.cuda.get_current_stream())
        return dev, pinned

    @staticmethod
    def host_float(x: Any) -> float:
        return float(x.get())  # synchronises: only for error_if_nonfinite

    @staticmethod
    def host_array(x: Any) -> np.ndarray:
        return x.get()  # synchronises: Stable-SPAM's per-tensor reductions (_spam.py)

    @staticmethod
    def clip_integers(x: Any, out: Any, lo: Any, hi: Any) -> None:
        _cupy().clip(x, lo, hi, out=out)

    @staticmethod
    def touched(arrays: list[Any]) -> None:
        """Nothing to record for CuPy."""


_TORCH_KINDS: dict[Any, str] = {}


class TorchCudaAdapter:
    name = "torch"

    @staticmethod
    def _torch() -> Any:
        return sys.modules["torch"]

    @staticmethod
    def kind(x: Any) -> str | None:
        if not _TORCH_KINDS:
            torch = sys.modules["torch"]
            _TORCH_KINDS.update(
                {
                    torch.float16: "float16",
                    torch.bfloat16: "bfloat16",
                    torch.float32: "float32",
                    torch.float64: "float64",
                }
            )
        return _TORCH_KINDS.get(x.dtype)

    @staticmethod
    def is_float(x: Any) -> bool:
        return bool(x.dtype.is_floating_point or x.dtype.is_complex)

    @staticmethod
    def device_id(x: Any) -> int:
        return int(x.device.index or 0)

    @staticmethod
    def ptr(x: Any) -> int:
        return int(x.data_ptr())

    @staticmethod
    def numel(x: Any) -> int:
        return int(x.numel())

    @staticmethod
    def contiguous(x: Any) -> bool:
        return bool(x.is_contiguous())

    @staticmethod
    def strides(x: Any) -> tuple[int, ...]:
        return tuple(x.stride())

    @staticmethod
    def as_contiguous(x: Any) -> Any:
        return x.detach().contiguous()

    @staticmethod
    def write_back(x: Any, values: Any) -> None:
        x.detach().copy_(values)

    @staticmethod
    def permute(x: Any, perm: tuple[int, ...]) -> Any:
        return x.detach().permute(perm)

    @staticmethod
    def reshape(x: Any, shape: tuple[int, ...]) -> Any:
        return x.reshape(shape)

    @staticmethod
    def _dtype(kind: str) -> Any:
        return getattr(sys.modules["torch"], kind)

    @staticmethod
    def empty(shape: tuple[int, ...], kind: str, like: Any) -> Any:
        torch = sys.modules["torch"]
        return torch.empty(shape, dtype=getattr(torch, kind), device=like.device)

    @staticmethod
    def empty_like(x: Any) -> Any:
        torch = sys.modules["torch"]
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @staticmethod
    def full_f64(value: float, like: Any) -> Any:
        torch = sys.modules["torch"]
        return torch.full((), value, dtype=torch.float64, device=like.device)

    @staticmethod
    def to_f64(value: Any) -> Any:
        torch = sys.modules["torch"]
        return value.detach().to(torch.float64).reshape(())

    @staticmethod
    def stream(x: Any) -> Any:
        """Launch on torch's current stream of x's device (ordered with torch's work)."""
        torch = sys.modules["torch"]
        s = torch.cuda.current_stream(x.device)
        return _cupy().cuda.ExternalStream(s.cuda_stream, TorchCudaAdapter.device_id(x))

    @staticmethod
    def stream_id(x: Any) -> int:
        torch = sys.modules["torch"]
        return int(torch.cuda.current_stream(x.device).cuda_stream)

    @staticmethod
    def upload(buf: np.ndarray, like: Any) -> tuple[Any, Any]:
        torch = sys.modules["torch"]
        pinned = torch.from_numpy(buf).pin_memory()
        return pinned.to(like.device, non_blocking=True), pinned

    @staticmethod
    def host_float(x: Any) -> float:
        return float(x.item())  # synchronises: only for error_if_nonfinite

    @staticmethod
    def host_array(x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()  # synchronises: Stable-SPAM's reductions (_spam.py)

    @staticmethod
    def clip_integers(x: Any, out: Any, lo: Any, hi: Any) -> None:
        torch = sys.modules["torch"]
        torch.clamp(x.detach(), lo, hi, out=out.detach())

    @staticmethod
    def touched(arrays: list[Any]) -> None:
        if arrays:
            sys.modules["torch"].autograd.graph.increment_version(arrays)


def lib_for(name: str) -> type[CupyAdapter] | type[TorchCudaAdapter]:
    """The adapter of a library name ("cupy", else torch CUDA)."""
    return CupyAdapter if name == "cupy" else TorchCudaAdapter


def on_device(lib: Any, like: Any) -> Any:
    """The device of ``like`` and its library's launch stream, as one context."""
    import cupy

    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(lib.device_id(like)))
    stack.enter_context(lib.stream(like))
    return stack


def check_kind(lib: Any, x: Any, what: str) -> str:
    """The storage kind of ``x``; TypeError for a dtype the kernels do not take."""
    kind = lib.kind(x)
    if kind is None:
        raise TypeError(
            f"{what} on the GPU needs float16, bfloat16, float32 or float64 arrays, got {x.dtype}"
        )
    return kind
