"""Adapters between user arrays (NumPy arrays, torch CPU tensors) and kernel storage.

Kernels see NumPy *storage views* that share the caller's memory:

* NumPy float32/float64/complex arrays as they are; float16 as an ``int16`` view;
* torch CPU tensors through ``detach().numpy()`` (zero-copy), bfloat16 as a
  ``uint16`` view and float16 as an ``int16`` view of the same bytes.

The adapters also make outputs of the caller's type and record in-place writes
with torch's autograd version counter (writes through a NumPy view do not).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

F16 = np.dtype(np.float16)
BF16_STORAGE = np.dtype(np.uint16)  # bfloat16 bits
F16_STORAGE = np.dtype(np.int16)  # float16 bits
FLOAT_STORAGE = frozenset(
    np.dtype(t) for t in (np.float32, np.float64, np.uint16, np.int16, np.complex64, np.complex128)
)
_WIDE = frozenset((np.dtype(np.float64), np.dtype(np.complex128)))
_COMPLEX = frozenset((np.dtype(np.complex64), np.dtype(np.complex128)))


def norm_dtype(storage: np.dtype) -> np.dtype:
    """float64 norms for float64/complex128 data, float32 for everything else."""
    return np.dtype(np.float64) if storage in _WIDE else np.dtype(np.float32)


def is_complex_storage(storage: np.dtype) -> bool:
    return storage in _COMPLEX


# NumPy float dtypes with a kernel (native byte order); long double has none.
_NUMPY_FLOATS = frozenset(
    np.dtype(t) for t in (np.float16, np.float32, np.float64, np.complex64, np.complex128)
)


def refuse_dtype(dt: np.dtype) -> None:
    """TypeError for byte-swapped data and long double, which no kernel reads.

    Raised before anything is allocated or written, by every function (norms,
    clipping by norm and by value, in place or not), so a refused call changes
    no input.
    """
    if not dt.isnative:
        raise TypeError(
            f"fastclip needs native byte order, got {dt.str} ({dt.name}, byte-swapped); "
            'convert first: x.astype(x.dtype.newbyteorder("="))'
        )
    raise TypeError(
        f"fastclip has no kernels for {dt.name}; convert first, e.g. x.astype(np.float64)"
    )


class NumpyLib:
    """NumPy arrays: zero-copy, float16 viewed as int16 bits."""

    name = "numpy"

    @staticmethod
    def storage(x: np.ndarray) -> np.ndarray:
        if type(x) is not np.ndarray:
            if isinstance(x, np.ma.MaskedArray):
                raise TypeError(
                    "fastclip does not take masked arrays (their mask would be ignored); "
                    "pass x.filled(0) or x.compressed()"
                )
            x = x.view(np.ndarray)  # np.matrix, memmap...: the same memory, plain ndarray
        dt = x.dtype
        if not dt.isnative or (dt.kind in "fc" and dt not in _NUMPY_FLOATS):
            refuse_dtype(dt)
        return x.view(np.int16) if dt == F16 else x

    @staticmethod
    def is_float(x: np.ndarray) -> bool:
        return x.dtype.kind in "fc"

    @staticmethod
    def writeable(x: np.ndarray) -> bool:
        return bool(x.flags.writeable)

    @staticmethod
    def empty_like(x: np.ndarray) -> np.ndarray:
        return np.empty(x.shape, x.dtype)

    @staticmethod
    def wrap(values: Any, dtype: np.dtype, like: Any) -> np.ndarray:
        # A float64 norm beyond float32's range is inf in a float32 result, as
        # documented (complex64 data of 3e38): not a warning the caller caused.
        with np.errstate(over="ignore"):
            return np.asarray(values, dtype=dtype)

    @staticmethod
    def touched(arrays: list[Any]) -> None:
        """Nothing to record for NumPy."""

    @staticmethod
    def dtype_name(x: np.ndarray) -> str:
        return str(x.dtype)


class TorchLib:
    """torch CPU tensors: ``detach().numpy()`` views; 16-bit floats as integer views."""

    name = "torch"

    @staticmethod
    def _torch() -> Any:
        return sys.modules["torch"]

    @staticmethod
    def storage(x: Any) -> np.ndarray:
        torch = sys.modules["torch"]
        if x.layout is not torch.strided:
            raise TypeError(
                f"fastclip needs dense (strided) tensors, got layout {x.layout}; "
                "call .to_dense() first (torch.nn.utils cannot clip sparse gradients either)"
            )
        t = x.detach()
        dt = t.dtype
        if dt is torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        if dt is torch.float16:
            return t.view(torch.int16).numpy()
        if t.is_conj() or t.is_neg():
            # Lazily conjugated/negated views have no plain memory to share.
            raise TypeError(
                "fastclip cannot share memory with a lazily conjugated or negated tensor; "
                "call .resolve_conj() / .resolve_neg() first"
            )
        return t.numpy()

    @staticmethod
    def is_float(x: Any) -> bool:
        return bool(x.dtype.is_floating_point or x.dtype.is_complex)

    @staticmethod
    def writeable(x: Any) -> bool:
        return True

    @staticmethod
    def empty_like(x: Any) -> Any:
        torch = sys.modules["torch"]
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @staticmethod
    def wrap(values: Any, dtype: np.dtype, like: Any) -> Any:
        torch = sys.modules["torch"]
        with np.errstate(over="ignore"):  # beyond float32's range: inf, as NumpyLib.wrap
            return torch.from_numpy(np.asarray(values, dtype=dtype))

    @staticmethod
    def touched(arrays: list[Any]) -> None:
        """Bump autograd's version counter of tensors written through NumPy views."""
        if arrays:
            sys.modules["torch"].autograd.graph.increment_version(arrays)

    @staticmethod
    def dtype_name(x: Any) -> str:
        return str(x.dtype).replace("torch.", "")


def lib_for(name: str) -> type[NumpyLib] | type[TorchLib]:
    return NumpyLib if name == "numpy" else TorchLib


def ml_dtypes_hint(lib: Any, x: Any) -> str:
    """The fix for a NumPy array of one of ml_dtypes' floats (JAX's bfloat16 on the host):
    NumPy calls them kind "V", and fastclip's bfloat16 is torch's."""
    if lib is NumpyLib and x.dtype.kind == "V" and "float" in str(x.dtype):
        return (
            f". NumPy arrays of ml_dtypes' {x.dtype} are not supported (fastclip's bfloat16 "
            "is torch.bfloat16): pass x.astype(np.float32), a torch tensor, or the JAX array"
        )
    return ""


def float_storage(lib: Any, x: Any, what: str) -> np.ndarray:
    """The storage view of a floating (or complex) array; TypeError otherwise."""
    if not lib.is_float(x):
        raise TypeError(
            f"{what} needs floating-point arrays (float16, bfloat16, float32, float64"
            f"{', complex' if what == 'norm' else ''}); got {lib.dtype_name(x)}"
            f"{ml_dtypes_hint(lib, x)}"
        )
    sv = lib.storage(x)
    if sv.dtype not in FLOAT_STORAGE:
        raise TypeError(
            f"{what} needs floating-point arrays (float16, bfloat16, float32, float64"
            f"{', complex' if what == 'norm' else ''}); got {lib.dtype_name(x)}"
        )
    return sv
