"""Pick the route for an array, or a list of arrays, with one dict lookup per type.

``backend_for(arrays)`` is the one dispatch every public function, the fused
optimizers, per-sample clipping and the distributed module use: it returns a
:class:`Backend`, the route with its adapter bound, and only this module
imports a route package (lazily, so ``import fastclip`` imports no numba,
torch, CuPy or jax).  The routes' interface is ``_typing.RouteOps``.

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
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import array_api_compat as aac
import numpy as np

from ._errors import GPUUnavailableError
from ._typing import StepClip
from ._validate import scalar_value

if TYPE_CHECKING:
    from ._typing import RouteOps

ROUTE_CPU = "numba-cpu"
ROUTE_GPU = "cupy-gpu"
ROUTE_GENERIC = "array-api"
ROUTE_DASK = "dask"


def check_gpu_available() -> None:
    """Raise GPUUnavailableError unless CuPy imports and sees a CUDA device."""
    try:
        import cupy
    except ImportError:
        raise GPUUnavailableError(
            "fastclip's GPU route needs CuPy: pip install 'fastclip[cupy]' (cupy-cuda13x; "
            "CUDA 12 users: pip install cupy-cuda12x). fastclip never copies device arrays "
            "to the host silently."
        ) from None
    if not cupy.is_available():
        raise GPUUnavailableError(
            "CuPy is installed but reports no usable CUDA device (cupy.is_available() is "
            "False), so fastclip's GPU route cannot run; fastclip never copies device "
            "arrays to the host silently."
        )


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
                f"{t.__module__}.{t.__qualname__}"
            )
        _LIBRARY[t] = lib
    return lib


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


def as_array_list(arrays: Any) -> list[Any]:
    """A list from one array or an iterable of arrays (generators are consumed once)."""
    if isinstance(arrays, (list, tuple)):
        return list(arrays)
    if hasattr(arrays, "shape") and hasattr(arrays, "dtype"):
        return [arrays]
    if isinstance(arrays, Mapping):  # iterating would give the keys
        raise TypeError(
            f"expected an array or an iterable of arrays, got a {type(arrays).__name__}; "
            "pass list(d.values())"
        )
    try:
        return list(arrays)
    except TypeError:
        raise TypeError(
            f"expected an array or an iterable of arrays, got {type(arrays).__name__}"
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
    lib = library_of(first)
    types_seen = set(map(type, arrays))
    if lib == "numpy":
        _refuse_numpy_scalars(arrays, types_seen)
    for t in types_seen:
        if t is not type(first):
            other = _LIBRARY.get(t) or library_of(next(a for a in arrays if type(a) is t))
            if other != lib:
                raise TypeError(
                    f"all arrays in one call must come from the same library, got {lib} and {other}"
                )
    route = route_of(first)
    if lib == "torch":
        check_plain_tensors(arrays)
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


# ------------------------------------------------------------------ backends


class Backend:
    """A route bound to its adapter: what the public API calls.

    ``route`` is the route's name (``fastclip.info()`` prints it), ``ops`` the
    route module (``RouteOps``) and ``lib`` the adapter its functions take
    first.  One instance per (route, library), built on first use and cached.
    """

    __slots__ = ("lib", "ops", "route")

    def __init__(self, route: str, ops: RouteOps, lib: Any) -> None:
        self.route, self.ops, self.lib = route, ops, lib

    def __repr__(self) -> str:
        return f"Backend({self.route!r}, lib={getattr(self.lib, 'name', self.lib)!r})"

    @property
    def on_gpu(self) -> bool:
        return self.route == ROUTE_GPU

    def norm(self, x: Any, pcode: int, p: float, *, axes: Any, keepdims: bool) -> Any:
        return self.ops.norm(self.lib, x, pcode, p, axes, keepdims)

    def global_norm(self, arrays: Sequence[Any], pcode: int, p: float) -> Any:
        return self.ops.global_norm(self.lib, arrays, pcode, p)

    def rescale(
        self,
        x: Any,
        pcode: int,
        p: float,
        *,
        axes: Any,
        max_norm: float,
        eps: float,
        mode: str,
        inplace: bool,
    ) -> tuple[Any, Any]:
        return self.ops.rescale(self.lib, x, pcode, p, axes, max_norm, eps, mode, inplace)

    def clip_global(
        self,
        arrays: list[Any],
        pcode: int,
        p: float,
        *,
        max_norm: float,
        eps: float,
        total_norm: Any,
        error_if_nonfinite: bool,
        inplace: bool,
    ) -> tuple[list[Any], Any]:
        return self.ops.clip_global(
            self.lib, arrays, max_norm, pcode, p, eps, total_norm, error_if_nonfinite, inplace
        )

    def clip_by_value(self, x: Any, lo: float | None, hi: float | None, *, inplace: bool) -> Any:
        return self.ops.clip_by_value(self.lib, x, lo, hi, inplace)

    def clamp_many_(self, arrays: list[Any], lo: float | None, hi: float | None) -> None:
        self.ops.clamp_many_(self.lib, arrays, lo, hi)

    def scale_(self, arrays: list[Any], factor: Any) -> None:
        self.ops.scale_(self.lib, arrays, factor)

    def clip_per_sample(
        self,
        items: list[Any],
        batch: int,
        pcode: int,
        p: float,
        *,
        bounds: Any,
        per_layer: bool,
        reduce: str | None,
        eps: float,
    ) -> tuple[list[Any], Any, int]:
        """Per-sample clipping (``fastclip.clip_per_sample``), validated arguments."""
        ops, lib = self.ops, self.lib
        if self.route == ROUTE_DASK:
            # The Dask route has no per-sample graph: its arrays take the generic
            # route's Array API code (dask.array's namespace), lazily.
            from . import _generic as ops

            lib = aac.array_namespace(items[0])
        return ops.clip_per_sample(lib, items, batch, pcode, p, bounds, per_layer, reduce, eps)

    def check_targets(self, arrays: list[Any], what: str) -> Any:
        """Every check an in-place clip of ``arrays`` makes before its first write,
        made now (nothing is written); what the route can reuse for ``norm64``.

        For callers that reduce the norm themselves (``fastclip.distributed``
        checks every rank before its one collective).  The Dask route checks
        nothing here (its graphs rebind arrays, they do not write them).
        """
        if self.route == ROUTE_DASK:
            return None
        ops: Any = self.ops  # not in RouteOps: the Dask route has no in-place writes
        return ops.check_targets(self.lib, arrays, what)

    def norm64(self, arrays: list[Any], pcode: int, p: float, checked: Any = None) -> Any:
        """The global norm as an exact float64 Python float on the CPU route
        (from float64 power sums, not rounded to the arrays' dtype); None on the
        other routes (callers use ``fastclip.global_norm`` there)."""
        if self.route != ROUTE_CPU:
            return None
        ops: Any = self.ops  # the CPU route's own operation
        return ops.norm64(self.lib, arrays, pcode, p, checked)

    # -- fused clip-and-step (fastclip.optim, fastclip.torch's fused optimizers)

    def adamw_step_(
        self, ps: list[Any], gs: list[Any], ms: list[Any], vs: list[Any], xs: Any, *,
        hp: Any, maximize: bool, clip: StepClip,
    ) -> Any:  # fmt: skip
        ops: Any = self.ops  # the CPU and GPU routes only (see backend_for_step)
        return ops.adamw_step_(self.lib, ps, gs, ms, vs, xs, hp, maximize, clip)

    def sgd_step_(
        self, ps: list[Any], gs: list[Any], bufs: Any, *, hp: Any, maximize: bool, clip: StepClip
    ) -> Any:
        ops: Any = self.ops
        return ops.sgd_step_(self.lib, ps, gs, bufs, hp, maximize, clip)

    def step_plan(self, grads: list[Any], clip: StepClip, what: str) -> Any:
        """The norm and coefficient of a step (host values on the CPU route, device
        values on the GPU route); nothing is written."""
        ops: Any = self.ops
        return ops.step_plan(self.lib, grads, clip, what)

    def step_prepare(self, lists: list[Any], amsgrad: bool | None, what: str) -> Any:
        """Validate and pack a launch of AdamW (``amsgrad`` a bool) or SGD (None)."""
        ops: Any = self.ops
        return ops.step_prepare(self.lib, lists, amsgrad, what)

    def step_run(
        self, prepared: Any, lists: list[Any], hp: Any, plan: Any, sign: float, amsgrad: Any
    ) -> None:
        ops: Any = self.ops
        ops.step_run(self.lib, prepared, lists, hp, plan, sign, amsgrad)

    def step_scalar(self, value: Any, name: str) -> Any:
        """A fused step's ``total_norm`` / ``clip_coef``: None, a host float, or on
        the GPU route a 0-d device array of the arrays' library (kept on the
        device: no sync)."""
        if value is None or type(value) is float:
            return value
        if self.on_gpu and hasattr(value, "shape") and not isinstance(value, np.ndarray):
            try:
                route = route_of(value)
            except TypeError:
                route = None
            if route == ROUTE_GPU:
                library = self.lib.name
                if library_of(value) != library:
                    raise TypeError(
                        f"{name} is a {library_of(value)} array but the arrays are {library} arrays"
                    )
                dtype = str(value.dtype)
                if math.prod(value.shape) != 1 or "complex" in dtype or "bool" in dtype:
                    raise TypeError(f"{name} must be a real number or a 0-d real array")
                return value
        return scalar_value(value, name)

    def scalar_arg(self, value: Any, name: str) -> Any:
        """A factor or total norm that stays an array: a device scalar on the GPU
        route (no host sync), a dask scalar on the Dask route (stays lazy); None
        otherwise (the caller takes its Python value).

        A dask scalar with non-dask arrays would be computed silently: TypeError.
        """
        if type(value) is float or not hasattr(value, "shape"):
            return None
        lazy = is_dask_array(value)
        if (self.route == ROUTE_GPU and not lazy) or (self.route == ROUTE_DASK and lazy):
            return value
        if lazy:
            raise TypeError(
                f"{name} is a dask array but the arrays are not: one call takes one library "
                f"(compute it first, or pass dask arrays)"
            )
        return None


# (route, library) -> Backend; the generic route is keyed by the array type
# (its adapter is the type's Array API namespace).
_BOUND: dict[tuple[str, Any], Backend] = {}


def _bind(route: str, lib: str, x: Any) -> Backend:
    key: tuple[str, Any] = (route, type(x) if route == ROUTE_GENERIC else lib)
    backend = _BOUND.get(key)
    if backend is None:
        backend = _BOUND[key] = _new_backend(route, lib, x)
    return backend


def _new_backend(route: str, lib: str, x: Any) -> Backend:
    """Import the route package (the only place that does) and bind its adapter."""
    ops: Any
    if route == ROUTE_CPU:
        from . import _cpu as ops

        return Backend(route, ops, ops.lib_for(lib))
    if route == ROUTE_GPU:
        check_gpu_available()  # once per binding, not per call
        from . import _gpu as ops

        return Backend(route, ops, ops.lib_for(lib))
    if route == ROUTE_DASK:
        from . import _dask as ops

        return Backend(route, ops, ops.DaskLib)
    from . import _generic as ops

    return Backend(route, ops, aac.array_namespace(x))


def backend_of(x: Any) -> Backend:
    """The backend of one array (TypeError for non-arrays and lazy torch views)."""
    return _bind(route_of(x), library_of(x), x)


def backend_for_step(lists: Sequence[Sequence[Any] | None], what: str) -> Backend:
    """The backend of a fused step's parallel lists (params first): the CPU route
    (NumPy, torch CPU: Numba kernels) or the GPU route (CuPy, torch CUDA: CUDA
    kernels); TypeError for any other library.

    On the GPU every array of every list must be a device array of the first
    one's library (device ids are compared by the route), and a missing CuPy or
    device raises ``GPUUnavailableError``.
    """
    params = list(lists[0] or ())
    first = params[0]
    if route_of(first) == ROUTE_GPU:
        name = library_of(first)
        for lst in lists:
            for a in lst or ():
                if library_of(a) != name or route_of(a) != ROUTE_GPU:
                    where = getattr(a, "device", type(a).__module__)
                    raise TypeError(
                        f"{what}: every array must be a {name} array on the GPU like the "
                        f"first parameter, got {type(a).__module__}.{type(a).__qualname__} on "
                        f"{where}; fastclip never moves data between host and device silently"
                    )
        return _bind(ROUTE_GPU, name, first)
    route = route_of_many(params)
    if route != ROUTE_CPU:
        raise TypeError(
            f"{what} runs on NumPy arrays and torch CPU tensors (fused Numba kernels); got "
            f"{type(first).__module__}.{type(first).__qualname__}. Use the clippers of "
            "fastclip.adaptive with your own optimizer for other Array API libraries."
        )
    return _bind(route, library_of(first), first)


def backend_for(arrays: Sequence[Any], *, defer_numpy: bool = True) -> Backend:
    """The common backend of a non-empty list (TypeError if libraries or devices differ).

    With ``defer_numpy`` a list starting with a plain ndarray is not walked
    here: the CPU route's bulk header read (``pack``) checks every item's exact
    type.  Operations that do not pack their arrays pass ``defer_numpy=False``.
    """
    if len(arrays) == 1:
        return backend_of(arrays[0])
    route = route_of_many(arrays, defer_numpy=defer_numpy)
    return _bind(route, library_of(arrays[0]), arrays[0])


# ------------------------------------------------------- small-array fast paths

_FAST: Any = None


def _fast() -> Any:
    global _FAST
    if _FAST is None:
        from ._cpu import _fast

        _FAST = _fast
    return _FAST


def small_norm(x: np.ndarray, ord: Any) -> Any:
    """The CPU route's whole-array norm of one small NumPy array, or None (take the
    general path).  Callers pass plain ``np.ndarray`` only."""
    return _fast().small_norm(x, ord)


def small_clip_(x: Any, max_norm: Any, ord: Any, eps: Any) -> Any:
    """The CPU route's in-place clip of one small float32 NumPy array, or None."""
    if type(x) is not np.ndarray:
        return None
    return _fast().small_clip_(x, max_norm, ord, eps)
