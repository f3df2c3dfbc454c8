"""Peers' clipping rules written as fastclip clips: optax's ``clip_by_block_rms``
and TensorFlow's ``clip_by_average_norm``.

Both are :func:`fastclip.clip_by_norm` with a bound scaled by the array's
size and ``eps = 0`` (derivations in each docstring), so they take the same
routes (Numba kernels on the CPU, CUDA kernels on the GPU, the generic Array
API code elsewhere) and the same zero-norm rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import array_api_compat as aac

from .. import _dispatch
from .._libraries import check_autograd_writable
from .._typing import Array
from .._validate import check_max_norm
from ._clip import clip_by_norm, clip_by_norm_

__all__ = [
    "clip_by_average_norm",
    "clip_by_average_norm_",
    "clip_by_block_rms",
    "clip_by_block_rms_",
]


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _positive(value: Any, name: str, fn: str) -> Any:
    """``value`` checked as a bound (a float); a dask array is returned as it is (its
    checks come with the arrays: ``_lazy``)."""
    if _dispatch.is_dask_array(value):
        return value
    try:
        return check_max_norm(value, name)
    except (TypeError, ValueError) as e:
        raise type(e)(f"fastclip.{fn}: {e}") from None


def _lazy(value: Any, items: list[Any], name: str, fn: str) -> Any:
    """A dask bound as a 0-d float64 dask array checked in the Dask route's graph
    (NumPy's ValueError when computed, nothing computed now); TypeError unless the
    arrays are dask arrays too.  Floats pass through."""
    if not _dispatch.is_dask_array(value) or not items:
        return value
    backend = _dispatch.backend_for(items, defer_numpy=False)
    try:
        return backend.lazy_bound(value, fn, name)  # TypeError unless dask arrays
    except (TypeError, ValueError) as e:
        raise type(e)(f"fastclip.{fn}: {e}") from None


def _bound(per_element: Any, k: float) -> Any:
    """The norm bound ``per_element * k``; an infinite bound stays infinite for an empty
    array (``inf * 0`` is NaN, and clip_by_norm refused it: "no clipping" is meant)."""
    if not isinstance(per_element, float):  # a lazy bound: inf * k is inf for k > 0
        return per_element * k if k else per_element
    return per_element if math.isinf(per_element) else per_element * k


def _arrays(x: Any, fn: str) -> tuple[list[Any], bool]:
    if _is_array(x):
        return [x], True
    if isinstance(x, (str, bytes)) or not isinstance(x, Iterable):
        raise TypeError(f"fastclip.{fn}: x must be an array or a list of arrays, got {x!r}")
    items = list(x)
    for i, a in enumerate(items):
        if not _is_array(a):
            raise TypeError(f"fastclip.{fn}: x[{i}] is not an array: {type(a).__name__}")
        if not aac.array_namespace(a).isdtype(a.dtype, ("real floating", "complex floating")):
            raise TypeError(
                f"fastclip.{fn}: x[{i}] has dtype {a.dtype}; blocks are floating-point arrays"
            )
    return items, False


def _divided(value: Any, d: float) -> Any:
    """A 0-d norm divided by ``d``, still a 0-d array of its library and dtype
    (NumPy would return a scalar)."""
    xp = aac.array_namespace(value)
    return xp.asarray(value / d, dtype=value.dtype)


def _size(x: Any) -> int:
    return math.prod(tuple(x.shape))


def clip_by_block_rms(x: Array | Iterable[Array], threshold: float) -> Any:
    r"""Scale each array so its root-mean-square is at most ``threshold`` (optax's rule).

    optax ``clip_by_block_rms(threshold)``: every leaf ("block") ``u`` becomes

    .. math:: u \,/\, \max\Big(1, \frac{\mathrm{rms}(u)}{\tau}\Big), \qquad
              \mathrm{rms}(u) = \sqrt{\tfrac{1}{n}\textstyle\sum_i |u_i|^2}
              = \frac{\|u\|_2}{\sqrt n}

    which is ``u * min(1, tau sqrt(n) / ||u||_2)``: :func:`fastclip.clip_by_norm`
    with ``max_norm = tau * sqrt(n)`` and ``eps = 0``, on its fast route.

    Parameters
    ----------
    x : array, or list of arrays
        float16, bfloat16, float32, float64 or complex; each array is one block.
    threshold : float
        ``tau >= 0`` (``inf``: no clipping).  A 0-d dask array, with dask
        blocks, stays lazy: its value is checked in the graph and a NaN or
        negative one raises the ValueError when the result is computed.

    Returns
    -------
    array or list of arrays
        New arrays, same library, dtype, shape and device as ``x``.  An
        all-zero block stays zero (optax: ``max(1, 0) = 1``); with ``tau = 0``
        every block becomes zero, an all-zero one included (where optax's
        ``0 / 0`` gives NaN).

    References
    ----------
    optax, ``optax.clip_by_block_rms`` (``optax/transforms/_clipping.py``).

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> fastclip.clip_by_block_rms(np.array([3.0, 4.0, 0.0, 0.0]), 1.0)  # rms 2.5
    array([1.2, 1.6, 0. , 0. ])
    """
    tau = _positive(threshold, "threshold", "clip_by_block_rms")
    items, single = _arrays(x, "clip_by_block_rms")
    tau = _lazy(tau, items, "threshold", "clip_by_block_rms")
    outs = [clip_by_norm(a, _bound(tau, math.sqrt(_size(a))), eps=0.0) for a in items]
    return outs[0] if single else outs


def clip_by_block_rms_(x: Array | Iterable[Array], threshold: float) -> Any:
    r"""In-place :func:`clip_by_block_rms`; returns each block's rms *before* clipping.

    Same formula and arguments; every array is modified in its own memory (dask
    arrays are rebound to their clipped graphs; with a dask ``threshold`` they
    raise the ValueError of a bad value when computed).
    Every argument and every array of a list (dtype, one library and device,
    writable, not sharing memory) is checked before the first is written.

    Returns
    -------
    array or list of arrays
        0-d rms of each block (0 for an empty one), float32 (float64 for
        float64 input), in ``x``'s library.

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> u = np.array([3.0, 4.0, 0.0, 0.0])
    >>> fastclip.clip_by_block_rms_(u, 1.0)
    array(2.5)
    >>> u
    array([1.2, 1.6, 0. , 0. ])
    """
    tau = _positive(threshold, "threshold", "clip_by_block_rms_")
    items, single = _arrays(x, "clip_by_block_rms_")
    tau = _lazy(tau, items, "threshold", "clip_by_block_rms_")
    if len(items) > 1:  # all checked before the first write (one array: clip_by_norm_ does)
        backend = _dispatch.backend_for(items, defer_numpy=False)
        if backend.is_torch:
            check_autograd_writable(items, "clip_by_block_rms_")
        backend.check_targets(items, "clip_by_block_rms_")
    rms = []
    for a in items:
        n = _size(a)
        nrm = clip_by_norm_(a, _bound(tau, math.sqrt(n)), eps=0.0)
        rms.append(_divided(nrm, math.sqrt(n)) if n else nrm)
    return rms[0] if single else rms


def clip_by_average_norm(x: Array, clip_norm: float) -> Array:
    r"""Clip by the average L2 norm ``||x||_2 / n`` (TensorFlow's ``clip_by_average_norm``).

    TensorFlow 1's ``tf.compat.v1.clip_by_average_norm(t, clip_norm)``
    computes ``t * clip_norm * min(n / ||t||_2, 1 / clip_norm)`` with ``n`` the
    number of elements, i.e.

    .. math:: y = x \cdot \min\Big(1, \frac{c}{\|x\|_2 / n}\Big)

    :func:`fastclip.clip_by_norm` with ``max_norm = c * n`` and ``eps = 0``,
    on its fast route.

    Parameters
    ----------
    x : array
        float16, bfloat16, float32, float64 or complex.
    clip_norm : float
        ``c >= 0`` (TensorFlow asks for ``c > 0``; ``inf``: no clipping).  A
        0-d dask array, with a dask ``x``, stays lazy: its value is checked in
        the graph and a NaN or negative one raises the ValueError when the
        result is computed.

    Returns
    -------
    array
        Same library, dtype, shape and device as ``x``.  ``x = 0`` stays 0
        (TensorFlow too); ``c = 0`` gives zeros (where TensorFlow's
        ``0 * inf`` gives NaN for ``x = 0``).

    References
    ----------
    TensorFlow, ``tf.compat.v1.clip_by_average_norm``
    (``tensorflow/python/ops/clip_ops.py``).

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> fastclip.clip_by_average_norm(np.array([3.0, 4.0]), 1.0)  # average norm 2.5
    array([1.2, 1.6])
    """
    c = _positive(clip_norm, "clip_norm", "clip_by_average_norm")
    if not _is_array(x):
        raise TypeError(f"fastclip.clip_by_average_norm: x must be an array, got {x!r}")
    c = _lazy(c, [x], "clip_norm", "clip_by_average_norm")
    return clip_by_norm(x, _bound(c, _size(x)), eps=0.0)


def clip_by_average_norm_(x: Array, clip_norm: float) -> Array:
    r"""In-place :func:`clip_by_average_norm`; returns ``||x||_2 / n`` *before* clipping.

    Same formula and arguments; ``x`` is modified in its own memory (a dask
    ``x`` is rebound to the clipped graph; with a dask ``clip_norm`` it raises
    the ValueError of a bad value when computed).

    Returns
    -------
    array
        0-d average norm (0 for an empty array), float32 (float64 for float64
        input), in ``x``'s library.

    Examples
    --------
    >>> import numpy as np, fastclip
    >>> t = np.array([3.0, 4.0])
    >>> fastclip.clip_by_average_norm_(t, 1.0)
    array(2.5)
    >>> t
    array([1.2, 1.6])
    """
    c = _positive(clip_norm, "clip_norm", "clip_by_average_norm_")
    if not _is_array(x):
        raise TypeError(f"fastclip.clip_by_average_norm_: x must be an array, got {x!r}")
    c = _lazy(c, [x], "clip_norm", "clip_by_average_norm_")
    n = _size(x)
    nrm = clip_by_norm_(x, _bound(c, n), eps=0.0)
    return _divided(nrm, float(n)) if n else nrm
