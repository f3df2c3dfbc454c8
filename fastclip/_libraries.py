"""Which library and which route an array belongs to: one dict lookup per type.

Routes (``fastclip.info()`` prints them for every installed library):

* ``numba-cpu``  NumPy arrays and torch CPU tensors: Numba kernels, zero-copy.
* ``cupy-gpu``   CuPy arrays and torch CUDA tensors: CuPy kernels on the device,
  zero-copy, on the caller's stream.  Without a usable CuPy they raise
  ``GPUUnavailableError`` rather than silently copy to the host.
* ``dask``       Dask arrays: lazy, chunk by chunk with the Numba kernels on the
  NumPy blocks (``fastclip._dask``).
* ``array-api``  any other Array API library (array-api-strict, JAX, ...,
  and torch tensors on devices other than CPU/CUDA): the generic implementation.

Detection goes through ``array_api_compat.is_*_array``, which looks a type's
module up in ``sys.modules`` and never imports torch, cupy or jax.  The choice
is cached per ``type(x)`` (einops does the same), so a list of 2,000 tensors
costs 2,000 ``type()`` calls, not 2,000 namespace inspections.

A leaf (imports nothing from fastclip): the dispatcher binds routes from these
answers, and the CPU route uses ``route_of_many`` for the full check of a list
whose bulk header read it could not take.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import array_api_compat as aac
import numpy as np

ROUTE_CPU = "numba-cpu"
ROUTE_GPU = "cupy-gpu"
ROUTE_GENERIC = "array-api"
ROUTE_DASK = "dask"


# type -> library key ("numpy", "torch", "cupy", "dask", or "xp" for other Array API types)
_LIBRARY: dict[type, str] = {}


def library_of(x: Any) -> str:
    """'numpy', 'torch', 'cupy', 'dask' or 'xp'; TypeError for non-arrays."""
    t = type(x)
    lib = _LIBRARY.get(t)
    if lib is None:
        if aac.is_numpy_array(x):
            lib = "numpy"
        elif aac.is_torch_array(x):
            lib = "torch"
        elif aac.is_cupy_array(x):
            lib = "cupy"
        elif aac.is_dask_array(x):
            lib = "dask"
        elif aac.is_array_api_obj(x) and not isinstance(x, (int, float, complex, bool)):
            lib = "xp"
        else:
            raise TypeError(
                f"expected an array (NumPy, torch, CuPy or any Array API array), got "
                f"{t.__module__}.{t.__qualname__}{_array_hint(x)}"
            )
        _LIBRARY[t] = lib
    return lib


def _array_hint(x: Any) -> str:
    """What to do with a common non-array: the fix, after a semicolon (or nothing)."""
    t = type(x)
    if t.__module__.startswith("pandas"):
        return "; pass its values: x.to_numpy()"
    if isinstance(x, (list, tuple, int, float)) and not isinstance(x, bool):
        return (
            "; wrap numbers in an array first: np.asarray(x) (a list of arrays goes to "
            "fastclip.global_norm / clip_by_global_norm)"
        )
    return ""


def library_name(x: Any) -> str:
    """The name users know an array's library by ("numpy", "torch", "jax", ...)."""
    lib = library_of(x)
    if lib != "xp":
        return lib
    try:  # jax arrays are jaxlib types; their namespace is jax.numpy
        return str(aac.array_namespace(x).__name__).split(".")[0]
    except TypeError:
        return type(x).__module__.split(".")[0]


def route_of(x: Any) -> str:
    """The route one array takes (see the module docstring)."""
    lib = library_of(x)
    if lib == "numpy":
        return ROUTE_CPU
    if lib == "torch":
        if x.is_neg() or x.is_conj():
            _refuse_lazy_view(x, "the array")
        kind = x.device.type
        if kind == "cpu":
            return ROUTE_CPU
        if kind == "cuda":
            return ROUTE_GPU
        return ROUTE_GENERIC  # mps, xpu, meta, ...: torch's own ops via array-api-compat
    if lib == "cupy":
        return ROUTE_GPU
    if lib == "dask":
        return ROUTE_DASK
    return ROUTE_GENERIC


def as_array_list(arrays: Any, arg: str = "") -> list[Any]:
    """A list from one array or an iterable of arrays (generators are consumed once).

    ``arg`` names the argument in the TypeError ("grads must be an array or an
    iterable of arrays"); without it the message says "expected an array", which
    the public function's wrapper rewrites with its own argument's name.
    """
    if isinstance(arrays, (list, tuple)):
        return list(arrays)
    if hasattr(arrays, "shape") and hasattr(arrays, "dtype"):
        return [arrays]
    subject = f"{arg} must be" if arg else "expected"
    if isinstance(arrays, Mapping):  # iterating would give the keys
        raise TypeError(
            f"{subject} an array or an iterable of arrays, got a {type(arrays).__name__}; "
            "pass list(d.values())"
        )
    try:
        return list(arrays)
    except TypeError:
        raise TypeError(
            f"{subject} an array or an iterable of arrays, got "
            f"{type(arrays).__module__}.{type(arrays).__qualname__}{_array_hint(arrays)}"
        ) from None


def route_of_many(arrays: Sequence[Any], defer_numpy: bool = False) -> str:
    """The common route of a non-empty list; TypeError if libraries or devices differ.

    Torch CPU lists are checked tensor by tensor (``is_cpu``) by the CPU driver
    while it gathers addresses.  With ``defer_numpy``, a list starting with a
    plain ndarray is not walked here: the CPU driver's bulk header read checks
    every item's exact type and calls back here for any list it cannot take.
    """
    first = arrays[0]
    if defer_numpy and type(first) is np.ndarray:
        return ROUTE_CPU
    try:
        lib = library_of(first)
    except TypeError as exc:
        raise name_item(exc, 0) from None
    types_seen = set(map(type, arrays))
    if lib == "numpy":
        _refuse_numpy_scalars(arrays, types_seen)
    for t in types_seen:
        if t is not type(first):
            i = next(i for i, a in enumerate(arrays) if type(a) is t)
            try:
                other = _LIBRARY.get(t) or library_of(arrays[i])
            except TypeError as exc:
                raise name_item(exc, i) from None
            if other != lib:
                a, b = library_name(first), library_name(arrays[i])
                raise TypeError(
                    f"item {i} of the list is a {b} array and item 0 of the list a {a} "
                    "array (convert them to one library first); all arrays in one call "
                    f"must come from the same library, got {a} and {b}"
                )
    if lib == "torch":
        check_plain_tensors(arrays)
    route = route_of(first)
    if lib == "torch" and route != ROUTE_CPU:
        device = first.device
        for a in arrays:
            if a.device != device:
                raise TypeError(
                    f"all tensors in one call must be on one device, got {device} and {a.device}"
                )
    elif lib == "xp":
        namespace = aac.array_namespace(first)
        for a in arrays:
            if aac.array_namespace(a) is not namespace:
                raise TypeError("all arrays in one call must come from the same Array API library")
    return route


def name_item(exc: BaseException, i: int) -> BaseException:
    """``exc`` (the same object) with a leading "expected an array" or "the array"
    reworded for item ``i`` of a list ("item 3 of the list must be an array")."""
    message = str(exc.args[0]) if exc.args else ""
    for old, new in (("expected an array", "must be an array"), ("the array ", "")):
        if message.startswith(old):
            exc.args = (f"item {i} of the list {new}{message[len(old) :]}",)
            break
    return exc


def _refuse_numpy_scalars(arrays: Sequence[Any], types_seen: set[type]) -> None:
    """TypeError for a NumPy scalar (``np.float32(3.0)``) in a list of arrays.

    Scalars have no memory of their own to read through an address table or
    to write in place, so lists take arrays only.
    """
    scalar_types = [t for t in types_seen if issubclass(t, np.generic)]
    if scalar_types:
        i = next(i for i, a in enumerate(arrays) if type(a) in scalar_types)
        raise TypeError(
            f"item {i} of the list is a NumPy scalar ({type(arrays[i]).__name__}), not an "
            "array; pass np.asarray(x) (a 0-d array) instead. NumPy scalars are immutable, "
            "so no in-place function can modify one"
        )


def check_plain_tensors(tensors: Sequence[Any]) -> None:
    """TypeError for a lazily negated or conjugated torch tensor anywhere in the list.

    Such views (``._neg_view()``, ``.conj()`` of a complex tensor, the
    ``.imag`` of a conjugated one) hold their values' sign or conjugation in a
    bit, not in memory, and fastclip's kernels read and write memory directly.
    Refused before any work on every route, for every function, so an
    in-place call never writes the un-negated values.
    """
    T = sys.modules["torch"].Tensor
    if any(map(T.is_neg, tensors)) or any(map(T.is_conj, tensors)):
        i = next(i for i, t in enumerate(tensors) if t.is_neg() or t.is_conj())
        _refuse_lazy_view(tensors[i], f"tensor {i} of the list")


def _refuse_lazy_view(t: Any, what: str) -> None:
    kind = "negated" if t.is_neg() else "conjugated"
    raise TypeError(
        f"{what} is a lazily {kind} torch view (its sign or conjugation is a flag, not "
        "memory; e.g. from ._neg_view(), .conj(), or .imag of a conjugated tensor), which "
        "fastclip's kernels cannot read or write; pass t.resolve_neg().resolve_conj() (a "
        "copy: for an in-place clip, clip the copy and copy it back)"
    )


def is_dask_array(x: Any) -> bool:
    """True for dask arrays (never imports dask)."""
    try:
        return library_of(x) == "dask"
    except TypeError:
        return False


_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def check_autograd_writable(tensors: Sequence[Any], what: str, arg: str = "arrays") -> None:
    """RuntimeError, before any write, for a torch tensor that requires grad while
    grad mode is on: torch's own rule for in-place operations, kept by fastclip.

    fastclip's kernels write memory directly, so autograd never sees the write.
    torch refuses ``p.mul_(0.5)`` on a leaf that requires grad outside
    ``torch.no_grad()`` ("a leaf Variable that requires grad is being used in an
    in-place operation"), and for a non-leaf it would record the operation in the
    graph, which a kernel outside torch cannot do.  ``clip_by_global_norm_
    (model.parameters(), 1.0)`` (the habit of ``torch.nn.utils.clip_grad_norm_``)
    would otherwise rescale the weights instead of their gradients.
    """
    if not sys.modules["torch"].is_grad_enabled() or not any(map(_REQUIRES_GRAD, tensors)):
        return  # the common cases: under no_grad, or gradients (which require none)
    i = next(i for i, t in enumerate(tensors) if t.requires_grad)
    t = tensors[i]
    where = arg if arg == "x" else f"{arg}[{i}]"  # x: the one-array functions' argument
    kind = "a leaf tensor that requires grad" if t.is_leaf else "a tensor that requires grad"
    raise RuntimeError(
        f"fastclip.{what}: {where} is {kind}; an in-place write outside torch.no_grad() would "
        "bypass autograd (torch refuses it too: 'a leaf Variable that requires grad is "
        "being used in an in-place operation'). To clip gradients, pass them: "
        "fastclip.torch.clip_grad_norm_(model.parameters(), max_norm) reads each "
        "parameter's .grad (or pass [p.grad for p in params]). To clip the weights "
        "themselves (weight clipping, max-norm constraints), call it inside "
        "`with torch.no_grad():`."
    )


def wide_dtype(xp: Any) -> Any:
    """float64 when the namespace really computes in it (not JAX without x64,
    which would truncate to float32 with a warning)."""
    return xp.float64 if _has_64_bits(xp) else xp.float32


def count_dtype(xp: Any) -> Any:
    """The integer dtype to count in: int64, or int32 for JAX without x64."""
    return xp.int64 if _has_64_bits(xp) else xp.int32


def _has_64_bits(xp: Any) -> bool:
    if aac.is_jax_namespace(xp):
        import jax

        return bool(jax.config.read("jax_enable_x64"))
    return True
