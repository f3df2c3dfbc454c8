"""Types shared across fastclip: array aliases, norm orders, and the route interface.

A leaf: imports nothing from fastclip.

A *route* is a module (``fastclip._cpu``, ``fastclip._gpu``, ``fastclip._dask``,
``fastclip._generic``) whose functions all take the route's *adapter* first
(``lib``: how that route reads and wraps one library's arrays; the Array API
namespace for the generic route) and implement the operations of
:class:`RouteOps`.  ``fastclip._dispatch.backend_for`` binds the adapter and
returns a :class:`fastclip._dispatch.Backend`, which is what the public API
calls.  mypy checks each route module against :class:`RouteOps`
(``_dispatch._ROUTE_CHECKS``).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any, Protocol

#: Any array fastclip accepts (NumPy, torch, CuPy, Dask, any Array API array).
Array = Any
#: One array or an iterable of arrays.
ArrayOrArrays = Any


class Ord(enum.IntEnum):
    """How the kernels reduce: the ``ord_code`` they take beside ``p``.

    ``check_ord`` maps ``ord=inf`` to ``INF``, 1 to ``L1``, 2 to ``L2`` and any
    other ``p > 0`` to ``P`` (``sum |x|**p``).  Kernels receive plain ints (an
    IntEnum member would be a new Numba type and a new compilation).
    """

    INF = 0
    L1 = 1
    L2 = 2
    P = 3


@dataclasses.dataclass(frozen=True)
class StepClip:
    """The clip arguments of a fused step, as the caller gave them (each route
    validates them with ``_validate.clip_mode`` / ``norm_args``)."""

    max_norm: Any = None
    norm_type: Any = 2.0
    total_norm: Any = None
    clip_coef: Any = None
    eps: Any = 1e-6
    nonfinite: str = "propagate"

    def args(self) -> tuple[Any, ...]:
        """``(max_norm, norm_type, total_norm, clip_coef, eps, nonfinite)``."""
        return (
            self.max_norm,
            self.norm_type,
            self.total_norm,
            self.clip_coef,
            self.eps,
            self.nonfinite,
        )


class RouteOps(Protocol):
    """The operations every route implements, with its adapter ``lib`` first.

    ``ord_code``/``p`` are ``check_ord``'s result; ``axes`` are validated reduction
    axes or None; ``mode`` is ``"clip"`` or ``"normalize"``.  Every in-place
    operation validates all its arrays before its first write.
    """

    def norm(
        self,
        lib: Any,
        x: Any,
        ord_code: int,
        p: float,
        axes: tuple[int, ...] | None,
        keepdims: bool,
    ) -> Any: ...

    def global_norm(
        self, lib: Any, arrays: Sequence[Any], ord_code: int, p: float, per_array: bool = False
    ) -> Any:
        """The 0-d norm; with ``per_array``, ``(total, per)``: ``per`` the 1-D norms of
        the arrays in the caller's order, in the norm dtype, from the same pass."""
        ...

    def rescale(
        self,
        lib: Any,
        x: Any,
        ord_code: int,
        p: float,
        axes: tuple[int, ...] | None,
        max_norm: float,
        eps: float,
        mode: str,
        inplace: bool,
    ) -> tuple[Any, Any]: ...

    def clip_global(
        self,
        lib: Any,
        arrays: list[Any],
        max_norm: float,
        ord_code: int,
        p: float,
        eps: float,
        total_norm: Any,
        error_if_nonfinite: bool,
        inplace: bool,
        per_array: bool = False,
    ) -> tuple[Any, ...]:
        """(outputs, total norm before clipping), and with ``per_array`` also the 1-D
        per-array norms before clipping; a non-finite total with ``error_if_nonfinite``
        raises ``NonFiniteNormError`` with ``indices`` before any write."""
        ...

    def clip_by_value(
        self, lib: Any, x: Any, lo: float | None, hi: float | None, inplace: bool
    ) -> Any: ...

    def clamp_many_(
        self, lib: Any, arrays: list[Any], lo: float | None, hi: float | None
    ) -> None: ...

    def scale_(self, lib: Any, arrays: list[Any], factor: Any) -> None: ...

    def clip_per_sample(
        self,
        lib: Any,
        items: list[Any],
        batch: int,
        ord_code: int,
        p: float,
        bounds: Any,
        per_layer: bool,
        reduce: str | None,
        eps: float,
    ) -> tuple[list[Any], Any, int]: ...
