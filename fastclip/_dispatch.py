"""The one dispatch: ``backend_for(arrays)`` binds the route of some arrays.

``backend_for`` (and ``backend_of`` for one array, ``backend_for_step`` for a
fused step's parallel lists) is what every public function, the fused
optimizers, per-sample clipping and the distributed module call: it returns a
:class:`Backend`, the route with its adapter bound.  Which route an array
takes is decided by ``_libraries`` (cached per type); only this module imports
a route package, lazily, so ``import fastclip`` imports no numba, torch, CuPy
or jax.  The routes' interface is ``_typing.RouteOps``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import array_api_compat as aac
import numpy as np

# ``public`` is re-exported for modules that import only ``_dispatch`` (the
# public functions' error naming: ``@_dispatch.public("fastclip.x")``).
from ._errors import GPUUnavailableError, public
from ._libraries import (
    ROUTE_CPU,
    ROUTE_DASK,
    ROUTE_GENERIC,
    ROUTE_GPU,
    as_array_list,
    check_autograd_writable,
    check_plain_tensors,
    is_dask_array,
    library_of,
    name_item,
    route_of,
    route_of_many,
)
from ._typing import StepClip
from ._validate import scalar_value

if TYPE_CHECKING:
    from ._typing import RouteOps

__all__ = [
    "ROUTE_CPU",
    "ROUTE_DASK",
    "ROUTE_GENERIC",
    "ROUTE_GPU",
    "Backend",
    "GPUUnavailableError",
    "as_array_list",
    "backend_for",
    "backend_for_step",
    "backend_of",
    "check_gpu_available",
    "check_plain_tensors",
    "cpu_status",
    "is_dask_array",
    "library_of",
    "public",
    "route_of",
    "route_of_many",
    "small_clip_",
    "small_norm",
]


def check_gpu_available() -> None:
    """Raise GPUUnavailableError unless CuPy imports and sees a CUDA device."""
    try:
        import cupy
    except ImportError:
        raise GPUUnavailableError(
            "fastclip's GPU route needs CuPy: pip install cupy-cuda13x (the 'cupy' extra; "
            "CUDA 12 users: pip install cupy-cuda12x). fastclip never copies device arrays "
            "to the host silently."
        ) from None
    if not cupy.is_available():
        raise GPUUnavailableError(
            "CuPy is installed but reports no usable CUDA device (cupy.is_available() is "
            "False), so fastclip's GPU route cannot run; fastclip never copies device "
            "arrays to the host silently."
        )


# ------------------------------------------------------------------ backends


class Backend:
    """A route bound to its adapter: what the public API calls.

    ``route`` is the route's name (``fastclip.info()`` prints it), ``ops`` the
    route module (``RouteOps``) and ``lib`` the adapter its functions take
    first.  One instance per (route, library), built on first use and cached.
    """

    __slots__ = ("is_torch", "lib", "ops", "route")

    def __init__(self, route: str, ops: RouteOps, lib: Any) -> None:
        self.route, self.ops, self.lib = route, ops, lib
        self.is_torch = getattr(lib, "name", None) == "torch"  # autograd's in-place rule

    def __repr__(self) -> str:
        return f"Backend({self.route!r}, lib={getattr(self.lib, 'name', self.lib)!r})"

    @property
    def on_gpu(self) -> bool:
        return self.route == ROUTE_GPU

    def _check_writes(self, arrays: Sequence[Any], what: str, arg: str = "arrays") -> None:
        """torch's in-place rule (``check_autograd_writable``), before any write;
        other libraries have no autograd to bypass."""
        if self.is_torch:
            check_autograd_writable(arrays, what, arg)

    def norm(self, x: Any, ord_code: int, p: float, *, axes: Any, keepdims: bool) -> Any:
        return self.ops.norm(self.lib, x, ord_code, p, axes, keepdims)

    def global_norm(
        self, arrays: Sequence[Any], ord_code: int, p: float, *, per_array: bool = False
    ) -> Any:
        """The 0-d global norm; with ``per_array``, ``(total, 1-D per-array norms)``."""
        if per_array:
            return self.ops.global_norm(self.lib, arrays, ord_code, p, True)
        return self.ops.global_norm(self.lib, arrays, ord_code, p)

    def rescale(
        self,
        x: Any,
        ord_code: int,
        p: float,
        *,
        axes: Any,
        max_norm: float,
        eps: float,
        mode: str,
        inplace: bool,
    ) -> tuple[Any, Any]:
        if inplace:
            self._check_writes([x], "clip_by_norm_" if mode == "clip" else "normalize_", "x")
        return self.ops.rescale(self.lib, x, ord_code, p, axes, max_norm, eps, mode, inplace)

    def clip_global(
        self,
        arrays: list[Any],
        ord_code: int,
        p: float,
        *,
        max_norm: float,
        eps: float,
        total_norm: Any,
        error_if_nonfinite: bool,
        inplace: bool,
        per_array: bool = False,
    ) -> tuple[list[Any], Any, Any]:
        """(outputs, 0-d total norm, 1-D per-array norms or None without ``per_array``)."""
        if inplace:
            self._check_writes(arrays, "clip_by_global_norm_")
        args = (arrays, max_norm, ord_code, p, eps, total_norm, error_if_nonfinite, inplace)
        if not per_array:  # the routes' two-value form (the one their other callers use)
            outs, total = self.ops.clip_global(self.lib, *args)
            return outs, total, None
        outs, total, per = self.ops.clip_global(self.lib, *args, True)
        return outs, total, per

    def clip_by_value(self, x: Any, lo: float | None, hi: float | None, *, inplace: bool) -> Any:
        if inplace:
            self._check_writes([x], "clip_by_value_", "x")
        return self.ops.clip_by_value(self.lib, x, lo, hi, inplace)

    def clamp_many(self, arrays: list[Any], lo: float | None, hi: float | None) -> list[Any]:
        """New clamped arrays: one launch per dtype on the CPU route (its tables
        read the inputs and write the outputs), one call per array elsewhere."""
        if self.route == ROUTE_CPU:
            ops: Any = self.ops  # the CPU route's own operation
            return ops.clamp_many(self.lib, arrays, lo, hi)
        return [self.ops.clip_by_value(self.lib, a, lo, hi, False) for a in arrays]

    def clamp_many_(self, arrays: list[Any], lo: float | None, hi: float | None) -> None:
        self._check_writes(arrays, "clip_by_value_", "x")
        self.ops.clamp_many_(self.lib, arrays, lo, hi)

    def scale_(self, arrays: list[Any], factor: Any) -> None:
        self._check_writes(arrays, "scale_")
        self.ops.scale_(self.lib, arrays, factor)

    def clip_per_sample(
        self,
        items: list[Any],
        batch: int,
        ord_code: int,
        p: float,
        *,
        bounds: Any,
        per_layer: bool,
        reduce: str | None,
        eps: float,
    ) -> tuple[list[Any], Any, int]:
        """Per-sample clipping (``fastclip.clip_per_sample``), validated arguments."""
        return self.ops.clip_per_sample(
            self.lib, items, batch, ord_code, p, bounds, per_layer, reduce, eps
        )

    def check_targets(self, arrays: list[Any], what: str) -> Any:
        """Every check an in-place clip of ``arrays`` makes before its first write,
        made now (nothing is written); what the route can reuse for ``norm64``.

        For callers that reduce the norm themselves (``fastclip.distributed``
        checks every rank before its one collective).  The Dask route checks
        known chunk sizes and that no array object comes twice (it rebinds them).
        """
        ops: Any = self.ops  # not in RouteOps
        return ops.check_targets(self.lib, arrays, what)

    def norm64(
        self, arrays: list[Any], ord_code: int, p: float, checked: Any = None, wide: bool = False
    ) -> Any:
        """The global norm from float64 power sums, not rounded to the arrays' dtype.

        CPU route: an exact float64 Python float (``wide``: every element
        accumulated in float64, so the value does not depend on how the elements
        are split among arrays; without it float32 blocks, then float64).  GPU
        route, with ``wide`` only: a float64 0-d device array of the arrays'
        library (CUDA kernels that widen every element, ``_gpu/_wide.py``),
        never read back to the host.  None on the other routes, and on the GPU
        route without ``wide`` (``fastclip.torch``'s total norm converts a
        non-None value with ``float()``, a host read on a device), where
        callers take ``fastclip.global_norm``.  ``checked``: what
        ``check_targets`` returned for exactly ``arrays``, reused.
        """
        ops: Any = self.ops  # the CPU and GPU routes' own operation
        if self.route == ROUTE_CPU or (self.route == ROUTE_GPU and wide):
            return ops.norm64(self.lib, arrays, ord_code, p, checked, wide)
        return None

    # -- fused clip-and-step (fastclip.optim, fastclip.torch's fused optimizers)

    def adamw_step_(
        self, ps: list[Any], gs: list[Any], ms: list[Any], vs: list[Any], xs: Any, *,
        hparams: Any, maximize: bool, clip: StepClip,
    ) -> Any:  # fmt: skip
        ops: Any = self.ops  # the CPU and GPU routes only (see backend_for_step)
        return ops.adamw_step_(self.lib, ps, gs, ms, vs, xs, hparams, maximize, clip)

    def sgd_step_(
        self,
        ps: list[Any],
        gs: list[Any],
        bufs: Any,
        *,
        hparams: Any,
        maximize: bool,
        clip: StepClip,
    ) -> Any:
        ops: Any = self.ops
        return ops.sgd_step_(self.lib, ps, gs, bufs, hparams, maximize, clip)

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
        self, prepared: Any, lists: list[Any], hparams: Any, plan: Any, sign: float, amsgrad: Any
    ) -> None:
        ops: Any = self.ops
        ops.step_run(self.lib, prepared, lists, hparams, plan, sign, amsgrad)

    # -- fused SPAM / Stable-SPAM steps (fastclip.torch.SPAMAdamW, StableSPAMAdamW)

    def spam_prepare(self, lists: list[Any], kind: str, what: str) -> Any:
        """Validate and pack a fused SPAM (``kind="spam"``) or Stable-SPAM step."""
        ops: Any = self.ops  # the CPU and GPU routes only (see backend_for_step)
        return ops.spam_prepare(self.lib, lists, kind, what)

    def spam_reduce(
        self, prepared: Any, n: int, op: str, hats: Any = None, shrinks: Any = None
    ) -> Any:
        """Per-tensor float64 values of the prepared gradients (``"max"``, ``"clipped_sq"``)."""
        ops: Any = self.ops
        return ops.spam_reduce(self.lib, prepared, n, op, hats, shrinks)

    def spam_run(
        self, prepared: Any, params: list[Any], hparams: Any, kind: str, amsgrad: bool
    ) -> None:
        ops: Any = self.ops
        ops.spam_run(self.lib, prepared, params, hparams, kind, amsgrad)

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

    def lazy_bound(self, value: Any, fn: str, name: str) -> Any:
        """A size-1 dask bound of ``fastclip.fn`` (``threshold`` of
        ``clip_by_block_rms``, ``clip_norm`` of ``clip_by_average_norm``) kept lazy:
        on the Dask route a 0-d float64 dask array whose value rule (``>= 0``, not
        NaN) raises the NumPy route's ValueError when computed; its shape and dtype
        errors now.  ``value`` itself when it is no dask array (the caller checked
        it); a dask bound with non-dask arrays: ``scalar_arg``'s TypeError.
        """
        if self.scalar_arg(value, name) is None or self.route != ROUTE_DASK:
            return value
        ops: Any = self.ops  # the Dask route's own check (only dask values reach it)
        return ops.checked_bound(self.lib, value, fn, name)

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
            f"{what}: the parameters must be NumPy arrays or torch CPU tensors (fused Numba "
            "kernels), or CuPy arrays or torch CUDA tensors (CUDA kernels); got "
            f"{type(first).__module__}.{type(first).__qualname__}. For other Array API "
            "libraries use the clippers of fastclip.adaptive with your own optimizer."
        )
    return _bind(route, library_of(first), first)


def backend_for(arrays: Sequence[Any], *, defer_numpy: bool = True) -> Backend:
    """The common backend of a non-empty list (TypeError if libraries or devices differ).

    With ``defer_numpy`` a list starting with a plain ndarray is not walked
    here: the CPU route's bulk header read (``pack``) checks every item's exact
    type.  Operations that do not pack their arrays pass ``defer_numpy=False``.
    """
    if len(arrays) == 1:
        try:
            return backend_of(arrays[0])
        except TypeError as exc:
            raise name_item(exc, 0) from None
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


def cpu_status() -> dict[str, Any]:
    """The CPU route's threading layer and kernel cache (``fastclip.info()``)."""
    from . import _cpu

    return _cpu.status()
