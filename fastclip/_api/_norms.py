"""The norms: ``norm``, ``global_norm`` and ``clip_coefficient``.

Each function validates its arguments, then makes one call to the backend that
``_dispatch`` binds for its arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _dispatch
from .._errors import name_error, public
from .._formulas import clip_coefficient as clip_coefficient_of_floats
from .._formulas import clip_coefficients
from .._typing import Array, ArrayOrArrays
from .._validate import check_eps, check_max_norm, check_ord, reduction_axes, scalar_value


def zero_norm() -> Any:
    """The norm of no arrays: ``0.0`` as a NumPy float32 0-d array (as torch gives 0)."""
    return np.asarray(0.0, dtype=np.float32)


def no_norms() -> Any:
    """The per-array norms of no arrays: an empty float32 NumPy array (``zero_norm``'s dtype)."""
    return np.zeros(0, dtype=np.float32)


def norm(
    x: Array, ord: float = 2, *, axis: int | tuple[int, ...] | None = None, keepdims: bool = False
) -> Array:
    r"""Vector p-norm of an array, over all elements or along ``axis``.

    .. math:: \|x\|_p = \Big(\sum_i |x_i|^p\Big)^{1/p}, \qquad
              \|x\|_\infty = \max_i |x_i|

    Parameters
    ----------
    x : array
        NumPy array, torch tensor or any Array API array; float16, bfloat16,
        float32, float64, complex64 or complex128 (complex values use ``|z|``).
    ord : float, default 2
        Any real ``p > 0`` or ``inf`` (also the string ``"inf"``).
    axis : int or tuple of int, optional
        The *reduction* axes (as in NumPy and Keras constraints); ``None``
        reduces over all elements (the array is treated as one flat vector).
    keepdims : bool, default False
        Keep reduced axes with size one.

    Returns
    -------
    array
        The norm(s), in ``x``'s library and on its device: float64 for float64
        and complex128 inputs, float32 otherwise; 0-d when all axes are reduced.

    Raises
    ------
    TypeError
        Not an array, or an integer/bool array.
    ValueError
        ``ord`` is not a real ``p > 0`` or ``inf``; ``axis`` is out of range
        (``numpy.exceptions.AxisError``) or repeated.

    Notes
    -----
    float32 and 16-bit data are summed in float32 inside blocks of 4,096
    elements and the block sums in float64: relative error about 1e-10 for
    1e8 elements (torch's ``vector_norm`` is off by ~5e-3 there).  A block
    whose float32 sum overflows is redone in float64, so values around 1e20
    give a finite norm.  NaN anywhere gives NaN; inf gives inf.

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> x = np.array([[3.0, 4.0], [6.0, 8.0]], dtype=np.float32)
    >>> fastclip.norm(x)
    array(11.18034, dtype=float32)
    >>> fastclip.norm(x, axis=1)
    array([ 5., 10.], dtype=float32)
    >>> fastclip.norm(x, ord=1)
    array(21., dtype=float32)
    >>> fastclip.norm(x, ord="inf")
    array(8., dtype=float32)
    """
    if axis is None and keepdims is False and type(x) is np.ndarray:
        fast = _dispatch.small_norm(x, ord)
        if fast is not None:
            return fast
    try:  # inline, not @public: its call costs 6-11% of a 10-element norm (_errors.public)
        ord_code, p = check_ord(ord)
        backend = _dispatch.backend_of(x)
        return backend.norm(x, ord_code, p, axes=reduction_axes(x, axis), keepdims=bool(keepdims))
    except (TypeError, ValueError) as exc:
        name_error(exc, "fastclip.norm", "x")
        raise


@public("fastclip.global_norm", "arrays")
def global_norm(arrays: ArrayOrArrays, ord: float = 2, *, per_array: bool = False) -> Any:
    r"""p-norm of all elements of many arrays together.

    .. math:: \Big(\sum_k \sum_i |x_{k,i}|^p\Big)^{1/p}
              = \big\|(\|x_1\|_p, \ldots, \|x_n\|_p)\big\|_p

    Parameters
    ----------
    arrays : array or iterable of arrays
        All from one library and on one device; dtypes may differ.
    ord : float, default 2
        Any real ``p > 0`` or ``inf``.
    per_array : bool, default False
        Also return the norm of each array (``||x_k||_p``), from the same
        pass over the data: the kernels' per-chunk partial sums are combined
        per array as well as in total, so no array is read twice.

    Returns
    -------
    array, or (array, array) with ``per_array``
        The 0-d norm in the arrays' library (float64 if any array is
        float64, else float32); with ``per_array``, ``(total, per)`` where
        ``per`` is the 1-D array of the ``n`` arrays' norms, in the caller's
        order, with the total's dtype, library and device (zero-size arrays
        have norm 0).  An empty list gives ``0.0`` (as torch), as a NumPy
        float32 0-d array (and an empty float32 ``per``).

    Notes
    -----
    N arrays of one dtype cost one parallel kernel launch (a table of
    addresses and sizes), not N.

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> grads = [np.full(4, 1.0, np.float32), np.full(5, 2.0, np.float32)]
    >>> fastclip.global_norm(grads)
    array(5., dtype=float32)
    >>> fastclip.global_norm([])
    array(0., dtype=float32)
    >>> pair = [np.array([3.0, 4.0], np.float32), np.array([12.0], np.float32)]
    >>> fastclip.global_norm(pair, per_array=True)
    (array(13., dtype=float32), array([ 5., 12.], dtype=float32))
    """
    ord_code, p = check_ord(ord)
    items = _dispatch.as_array_list(arrays)
    if not items:
        return (zero_norm(), no_norms()) if per_array else zero_norm()
    backend = _dispatch.backend_for(items)
    if per_array:
        return backend.global_norm(items, ord_code, p, per_array=True)
    return backend.global_norm(items, ord_code, p)


@public("fastclip.clip_coefficient")
def clip_coefficient(total_norm: Any, max_norm: float, eps: float = 1e-6) -> Any:
    r"""The clip coefficient ``min(1, max_norm / (total_norm + eps))``.

    Computed with the array operations of ``total_norm``'s own library and on
    its device (no host synchronisation for device arrays); a Python number
    gives a Python float.  NaN propagates; ``total_norm = inf`` gives 0.

    Raises
    ------
    ValueError
        A negative Python-number ``total_norm`` (arrays are not inspected: that
        would synchronise with the device), or a bad ``max_norm`` or ``eps``.
    TypeError
        ``total_norm`` is neither a real number nor an array.

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> fastclip.clip_coefficient(np.asarray(4.0, np.float32), 2.0, eps=0.0)
    array(0.5, dtype=float32)
    >>> fastclip.clip_coefficient(0.5, 2.0)
    1.0
    """
    c = check_max_norm(max_norm)
    eps_v = check_eps(eps)
    if isinstance(total_norm, (int, float)) and not isinstance(total_norm, bool):
        n = scalar_value(total_norm, "total_norm")
        if n < 0:
            raise ValueError(f"total_norm must be >= 0 (or NaN/inf), got {n}")
        return clip_coefficient_of_floats(c, n, eps_v)
    import array_api_compat as aac

    if not aac.is_array_api_obj(total_norm) or isinstance(total_norm, bool):
        raise TypeError(
            f"total_norm must be a real number or an array, got {type(total_norm).__name__}"
        )
    return clip_coefficients(total_norm, c, eps_v, xp=aac.array_namespace(total_norm))
