"""Clipping many arrays together: ``clip_by_global_norm`` (out of place and in
place), ``scale_`` and the many-array value clamp ``clip_values_``.

Each function validates its arguments, then makes one call to the backend that
``_dispatch`` binds for its arrays.
"""

from __future__ import annotations

from typing import Any

from .. import _dispatch
from .._errors import name_error, public
from .._typing import ArrayOrArrays
from .._validate import (
    check_bounds,
    check_eps,
    check_max_norm,
    check_ord,
    check_orderable,
    scalar_value,
)
from ._norms import no_norms, zero_norm


def clip_values_(arrays: ArrayOrArrays, min: float | None = None, max: float | None = None) -> None:
    """:func:`clip_by_value_` on many arrays with one kernel launch per dtype (private).

    Every array is validated (dtype, writeability, shared elements, one
    library) before the first is written, so a refused list is left unchanged.
    """
    lo, hi = check_bounds(min, max)
    items = _dispatch.as_array_list(arrays)
    if not items:
        return
    backend = _dispatch.backend_for(items)
    check_orderable(items)
    backend.clamp_many_(items, lo, hi)


def _total_norm_value(total_norm: Any) -> float | None:
    if total_norm is None:
        return None
    value = scalar_value(total_norm, "total_norm")
    if value < 0:
        raise ValueError(f"total_norm must be >= 0 (or NaN/inf), got {value}")
    return value


def _clip_global(
    arrays: Any,
    max_norm: Any,
    ord: Any,
    eps: Any,
    total_norm: Any,
    error_if_nonfinite: bool,
    inplace: bool,
    per_array: bool = False,
) -> tuple[list[Any], Any, Any]:
    lazy = _dispatch.is_dask_array(max_norm)  # checked in the Dask route's graph
    c: Any = None if lazy else check_max_norm(max_norm)
    ord_code, p = check_ord(ord)
    eps_v = check_eps(eps)
    items = _dispatch.as_array_list(arrays)
    if not items:
        return [], zero_norm(), no_norms() if per_array else None
    backend = _dispatch.backend_for(items)
    if lazy:
        c = backend.scalar_arg(max_norm, "max_norm")  # TypeError unless dask arrays
    given: Any = backend.scalar_arg(total_norm, "total_norm")  # device: no host sync
    if given is None:
        given = _total_norm_value(total_norm)
    return backend.clip_global(
        items,
        ord_code,
        p,
        max_norm=c,
        eps=eps_v,
        total_norm=given,
        error_if_nonfinite=bool(error_if_nonfinite),
        inplace=inplace,
        per_array=bool(per_array),
    )


@public("fastclip.clip_by_global_norm", "arrays")
def clip_by_global_norm(
    arrays: ArrayOrArrays,
    max_norm: float,
    ord: float = 2,
    *,
    eps: float = 1e-6,
    total_norm: Any = None,
    error_if_nonfinite: bool = False,
    per_array: bool = False,
) -> Any:
    r"""Scale many arrays by one coefficient so their global norm is at most ``max_norm``.

    .. math:: y_k = x_k \cdot \min\Big(1, \frac{c}{\|(x_1,\ldots,x_n)\|_p + \varepsilon}\Big)

    Parameters
    ----------
    arrays : array or iterable of arrays
        From one library, on one device; dtypes may differ.
    max_norm : float
        ``c >= 0``.
    ord : float, default 2
        Any real ``p > 0`` or ``inf``.
    eps : float, default 1e-6
        Added to the norm in the denominator (torch uses 1e-6; optax uses 0).
    total_norm : float or 0-d array, optional
        Use this norm instead of computing it (e.g. one reduced across ranks).
    error_if_nonfinite : bool, default False
        Raise :class:`fastclip.NonFiniteNormError` (a RuntimeError) when the
        norm is NaN or inf, before anything is written; its ``indices`` are
        the positions of the arrays whose own norm is not finite.  By default
        a non-finite norm propagates: every output becomes NaN (or 0 for inf).
    per_array : bool, default False
        Also return each array's norm before clipping, from the same pass
        (see :func:`global_norm`).

    Returns
    -------
    (list of arrays, array), or (list of arrays, array, array) with ``per_array``
        New arrays (same library, dtypes, shapes, device) and the 0-d total
        norm before clipping; with ``per_array`` also the 1-D per-array norms
        before clipping (``global_norm(arrays, ord, per_array=True)[1]``).

    Notes
    -----
    Lists of arrays at least ``fastclip._config.PARALLEL_MIN_ELEMENTS`` long in
    total run the parallel Numba kernels; set that value (an int) to move the
    threshold.

    References
    ----------
    Pascanu, Mikolov and Bengio, "On the difficulty of training Recurrent Neural
    Networks", ICML 2013, https://arxiv.org/abs/1211.5063

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> out, total = fastclip.clip_by_global_norm([np.array([3.0]), np.array([4.0])], 1.0, eps=0)
    >>> total, out
    (array(5.), [array([0.6]), array([0.8])])
    """
    outs, total, per = _clip_global(
        arrays, max_norm, ord, eps, total_norm, error_if_nonfinite, False, per_array
    )
    return (outs, total, per) if per_array else (outs, total)


def clip_by_global_norm_(
    arrays: ArrayOrArrays,
    max_norm: float,
    ord: float = 2,
    *,
    eps: float = 1e-6,
    total_norm: Any = None,
    error_if_nonfinite: bool = False,
    per_array: bool = False,
) -> Any:
    r"""Global-norm clipping in place; returns the total norm before clipping.

    Same formula and arguments as :func:`clip_by_global_norm`.  All arrays are
    validated (dtypes, writeability, one library, no two sharing memory)
    before any is modified, and a :class:`fastclip.NonFiniteNormError` is
    raised before any write.  With ``per_array=True`` the result is
    ``(total, per)``: ``per`` the 1-D norms of the arrays before clipping,
    computed by the same launch (one per dtype) that clips them.

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> grads = [np.array([3.0], np.float32), np.array([4.0], np.float32)]
    >>> fastclip.clip_by_global_norm_(grads, 1.0)
    array(5., dtype=float32)
    >>> grads
    [array([0.6], dtype=float32), array([0.8], dtype=float32)]
    >>> grads = [np.array([3.0], np.float32), np.array([4.0], np.float32)]
    >>> fastclip.clip_by_global_norm_(grads, 0.5, eps=0.0, per_array=True)
    (array(5., dtype=float32), array([3., 4.], dtype=float32))
    >>> grads
    [array([0.3], dtype=float32), array([0.4], dtype=float32)]
    """
    if (
        not per_array
        and total_norm is None
        and not error_if_nonfinite
        and type(arrays) is list
        and len(arrays) == 1
    ):
        fast = _dispatch.small_clip_(arrays[0], max_norm, ord, eps)
        if fast is not None:
            return fast
    try:  # inline, not @public: its call costs 6-11% of the small-array path (_errors.public)
        _, total, per = _clip_global(
            arrays, max_norm, ord, eps, total_norm, error_if_nonfinite, True, per_array
        )
    except (TypeError, ValueError) as exc:
        name_error(exc, "fastclip.clip_by_global_norm_", "arrays")
        raise
    return (total, per) if per_array else total


@public("fastclip.scale_", "arrays")
def scale_(arrays: ArrayOrArrays, factor: Any) -> None:
    r"""Multiply arrays in place by a scalar or 0-d array: ``x_k *= factor``.

    One kernel launch per dtype for any number of arrays.  16-bit data is
    multiplied in float32 and rounded once.

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> a, b = np.ones(2, np.float32), np.ones(3, np.float32)
    >>> fastclip.scale_([a, b], 0.5)
    >>> a, b
    (array([0.5, 0.5], dtype=float32), array([0.5, 0.5, 0.5], dtype=float32))
    """
    items = _dispatch.as_array_list(arrays)
    if not items:
        return
    backend = _dispatch.backend_for(items)
    value: Any = backend.scalar_arg(factor, "factor")  # device: no host sync
    if value is None:
        value = scalar_value(factor, "factor")
    backend.scale_(items, value)
