"""Clipping one array: by value (``clip_by_value``), by norm (``clip_by_norm``),
and normalising (``normalize``), each out of place and in place.

Each function validates its arguments, then makes one call to the backend that
``_dispatch`` binds for its array.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .. import _dispatch
from .._errors import name_error, public
from .._typing import Array
from .._validate import (
    check_bounds,
    check_eps,
    check_max_norm,
    check_ord,
    check_orderable,
    reduction_axes,
)
from . import _bounds


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


@public("fastclip.clip_by_value", "x")
def clip_by_value(
    x: Array | Iterable[Array], min: float | None = None, max: float | None = None
) -> Any:
    r"""Clamp every element to ``[min, max]``, into a new array (or new arrays).

    .. math:: y_i = \min(\max(x_i, \mathrm{min}), \mathrm{max})

    Parameters
    ----------
    x : array, or list or iterable of arrays
        Any real dtype, integer and bool included (complex raises TypeError).
        A list (one library, one device; dtypes may differ) is clamped with
        one kernel launch per dtype on the CPU route (one call per array on
        the others).
    min, max : float, optional
        Bounds (Python numbers or 0-d arrays); at least one is required,
        ``min <= max``, neither NaN.  For integer arrays the bounds are rounded
        inward (``ceil(min)``, ``floor(max)``).  Arrays of x's library and
        device broadcasting to ``x.shape`` (TensorFlow's tensor bounds) are
        applied elementwise to one floating-point ``x`` (``fastclip._api._bounds``).

    Returns
    -------
    array or list of arrays
        Same library, dtype, shape and device as ``x`` (for a list, a list of
        new arrays in its order); ``x`` is untouched.  NaN elements stay NaN
        (as ``torch.clamp`` and ``numpy.clip``).

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> fastclip.clip_by_value(np.array([-2.0, 0.5, 3.0]), -1, 1)
    array([-1. ,  0.5,  1. ])
    >>> fastclip.clip_by_value([np.array([-2.0]), np.array([3.0, 0.5])], -1, 1)
    [array([-1.]), array([1. , 0.5])]
    """
    if _bounds.is_array_bound(min) or _bounds.is_array_bound(max):  # TensorFlow's tensor bounds
        return _bounds.clip_by_value_arrays(x, min, max, inplace=False)
    lo, hi = check_bounds(min, max)
    if _is_array(x):
        return _dispatch.backend_of(x).clip_by_value(x, lo, hi, inplace=False)
    items = _dispatch.as_array_list(x)
    if not items:
        return []
    backend = _dispatch.backend_for(items, defer_numpy=False)
    check_orderable(items)
    return backend.clamp_many(items, lo, hi)


@public("fastclip.clip_by_value_", "x")
def clip_by_value_(
    x: Array | Iterable[Array], min: float | None = None, max: float | None = None
) -> Any:
    r"""Clamp every element to ``[min, max]`` in place (weight clipping); returns the arrays.

    Same semantics as :func:`clip_by_value`.  WGAN-style weight clipping of a
    whole torch model is one line (torch tensors that require grad are written
    only under ``torch.no_grad()``, as torch's own in-place operations):

    .. code-block:: python

        with torch.no_grad():
            fastclip.clip_by_value_(critic.parameters(), -0.01, 0.01)

    Parameters
    ----------
    x : array, or list or iterable of arrays
        Any real dtype, integer and bool included, modified in its own memory.
        A list (one library, one device; dtypes may differ) takes one kernel
        launch per dtype; every array is validated before the first is written.
    min, max : float, optional
        Bounds, as for :func:`clip_by_value`.

    Returns
    -------
    array or list of arrays
        ``x`` itself for an array; for a list (or any iterable), a new list
        holding the same array objects, now clipped.

    Raises
    ------
    ValueError
        A read-only NumPy array (or one whose elements share memory), before
        any write.
    TypeError
        Immutable arrays (JAX), complex arrays.
    RuntimeError
        A torch tensor that requires grad, outside ``torch.no_grad()``
        (autograd would not see the write; torch refuses it too).

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> w = np.array([-0.5, 0.005, 0.2], dtype=np.float32)
    >>> fastclip.clip_by_value_(w, -0.01, 0.01) is w
    True
    >>> w
    array([-0.01 ,  0.005,  0.01 ], dtype=float32)
    """
    if _bounds.is_array_bound(min) or _bounds.is_array_bound(max):  # TensorFlow's tensor bounds
        return _bounds.clip_by_value_arrays(x, min, max, inplace=True)
    lo, hi = check_bounds(min, max)
    if _is_array(x):
        return _dispatch.backend_of(x).clip_by_value(x, lo, hi, inplace=True)
    items = _dispatch.as_array_list(x)
    if items:
        backend = _dispatch.backend_for(items)
        check_orderable(items)
        backend.clamp_many_(items, lo, hi)
    return items


def _rescale(
    x: Any, max_norm: float, ord: Any, axis: Any, eps: Any, mode: str, inplace: bool
) -> Any:
    ord_code, p = check_ord(ord)
    eps_v = check_eps(eps)
    backend = _dispatch.backend_of(x)
    axes = reduction_axes(x, axis)
    return backend.rescale(
        x, ord_code, p, axes=axes, max_norm=max_norm, eps=eps_v, mode=mode, inplace=inplace
    )


@public("fastclip.clip_by_norm", "x")
def clip_by_norm(
    x: Array,
    max_norm: float,
    ord: float = 2,
    *,
    axis: int | tuple[int, ...] | None = None,
    eps: float = 1e-6,
) -> Array:
    r"""Scale ``x`` down so its norm is at most ``max_norm``, into a new array.

    .. math:: y = x \cdot \min\Big(1, \frac{c}{\|x\|_p + \varepsilon}\Big)

    The coefficient is always multiplied in (no branch on its value), as in
    ``torch.nn.utils.clip_grad_norm_``; ``eps`` keeps the division finite at
    ``x = 0``.  With ``axis``, each slice along the kept axes is clipped on its
    own: ``clip_by_norm(g, c, axis=1)`` on ``[B, D]`` clips every row (per-sample
    clipping; a Keras ``MaxNorm(c, axis=...)`` constraint uses the same axes).

    Parameters
    ----------
    x : array
        float16, bfloat16, float32, float64 or complex.
    max_norm : float
        ``c >= 0`` (``inf`` disables clipping); NaN or negative raise ValueError.
        An array broadcasting to the norms' ``keepdims`` shape gives each slice
        its own bound (TensorFlow's tensor ``clip_norm``; ``fastclip._api._bounds``).
    ord : float, default 2
        Any real ``p > 0`` or ``inf``.
    axis : int or tuple of int, optional
        Reduction axes of the norm; ``None`` = the whole array.
    eps : float, default 1e-6
        Added to the norm in the denominator.

    Returns
    -------
    array
        Same library, dtype, shape and device as ``x``.  A NaN norm makes the
        output NaN (it propagates, as in torch).

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> g = np.array([3.0, 4.0])
    >>> fastclip.clip_by_norm(g, 1.0, eps=0.0)
    array([0.6, 0.8])
    >>> fastclip.clip_by_norm(np.array([[3.0, 4.0], [0.3, 0.4]]), 1.0, axis=1, eps=0.0)
    array([[0.6, 0.8],
           [0.3, 0.4]])
    """
    if _bounds.is_array_bound(max_norm):  # one bound per slice (TensorFlow's tensor clip_norm)
        return _bounds.clip_by_norm_arrays(x, max_norm, ord, axis, eps, inplace=False)
    c = check_max_norm(max_norm)
    return _rescale(x, c, ord, axis, eps, "clip", False)[0]


def clip_by_norm_(
    x: Array,
    max_norm: float,
    ord: float = 2,
    *,
    axis: int | tuple[int, ...] | None = None,
    eps: float = 1e-6,
) -> Array:
    r"""Clip by norm in place; returns the norm(s) *before* clipping.

    Same formula and arguments as :func:`clip_by_norm`; ``x`` (a NumPy
    array, a torch tensor or its ``.grad``) is modified in its own memory.

    Returns
    -------
    array
        0-d norm (``axis=None``) or one norm per kept slice, float32
        (float64 for float64 input), in ``x``'s library.

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> g = np.array([3.0, 4.0], dtype=np.float32)
    >>> fastclip.clip_by_norm_(g, 1.0, eps=0.0)
    array(5., dtype=float32)
    >>> g
    array([0.6, 0.8], dtype=float32)
    """
    if _bounds.is_array_bound(max_norm):  # one bound per slice (TensorFlow's tensor clip_norm)
        return _bounds.clip_by_norm_arrays(x, max_norm, ord, axis, eps, inplace=True)
    if axis is None and type(x) is np.ndarray:
        fast = _dispatch.small_clip_(x, max_norm, ord, eps)
        if fast is not None:
            return fast
    try:  # inline, not @public: its call costs 6-11% of the small-array path (_errors.public)
        c = check_max_norm(max_norm)
        return _rescale(x, c, ord, axis, eps, "clip", True)[1]
    except (TypeError, ValueError) as exc:
        name_error(exc, "fastclip.clip_by_norm_", "x")
        raise


@public("fastclip.normalize", "x")
def normalize(
    x: Array, ord: float = 2, *, axis: int | tuple[int, ...] | None = None, eps: float = 1e-6
) -> Array:
    r"""Divide by the norm: ``x / (||x||_p + eps)``, into a new array.

    .. math:: y = \frac{x}{\|x\|_p + \varepsilon}

    The "clipping" that always rescales to (almost) unit norm, whole array or
    per slice (``axis`` = reduction axes, like Keras ``UnitNorm``).

    Parameters
    ----------
    x : array
        float16, bfloat16, float32, float64 or complex.
    ord : float, default 2
        Any real ``p > 0`` or ``inf``.
    axis : int or tuple of int, optional
        Reduction axes of the norm; ``None`` = the whole array.
    eps : float, default 1e-6
        Added to the norm in the denominator (``eps = 0`` with a zero norm
        gives NaN: 0 / 0).

    Returns
    -------
    array
        Same library, dtype, shape and device as ``x``; ``x`` is untouched.

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> fastclip.normalize(np.array([3.0, 4.0]), eps=0.0)
    array([0.6, 0.8])
    >>> fastclip.normalize(np.array([1.0, 3.0]), ord=1, eps=0.0)
    array([0.25, 0.75])
    """
    return _rescale(x, 0.0, ord, axis, eps, "normalize", False)[0]


@public("fastclip.normalize_", "x")
def normalize_(
    x: Array, ord: float = 2, *, axis: int | tuple[int, ...] | None = None, eps: float = 1e-6
) -> Array:
    r"""Divide by the norm in place; returns the norm(s) before normalising.

    Same formula and arguments as :func:`normalize`; ``x`` is modified in its
    own memory (read-only arrays raise before any write).

    Returns
    -------
    array
        0-d norm (``axis=None``) or one norm per kept slice, float32 (float64
        for float64 input), in ``x``'s library.

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> v = np.array([[3.0, 4.0], [0.0, 2.0]])
    >>> fastclip.normalize_(v, axis=1, eps=0.0)
    array([5., 2.])
    >>> v
    array([[0.6, 0.8],
           [0. , 1. ]])
    """
    return _rescale(x, 0.0, ord, axis, eps, "normalize", True)[1]
