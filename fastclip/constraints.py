r"""Keras-style weight constraints on any array: ``MaxNorm``, ``MinMaxNorm``,
``UnitNorm`` and ``NonNeg``, with Keras' ``get_config`` / ``from_config``.

Each constraint is a callable ``w -> new w`` with Keras 3's formula
(``keras/src/constraints/constraints.py``), ``axis`` the *reduction* axes of
the norm as in Keras (``axis=0`` on a Dense kernel ``[in, out]``: one norm
per output unit; ``[0, 1, 2]`` on an ``HWIO`` conv kernel: one per filter).
With :math:`n = \|w\|_2` over ``axis`` and :math:`\epsilon = 10^{-7}` (Keras'
``backend.epsilon()``):

* ``MaxNorm(c)``: :math:`w \cdot \mathrm{clip}(n, 0, c) / (\epsilon + n)`;
* ``MinMaxNorm(lo, hi, rate)``: :math:`w \cdot d / (\epsilon + n)` with
  :math:`d = \mathrm{rate}\cdot\mathrm{clip}(n, lo, hi) + (1 - \mathrm{rate})\, n`;
* ``UnitNorm()``: :math:`w / (\epsilon + n)`;
* ``NonNeg()``: :math:`\max(w, 0)`.

The norms come from :func:`fastclip.norm` (the array's fast route: Numba on
the CPU, CUDA on the GPU, the generic Array API code elsewhere; float64
accumulation, so float32 results are closer to the exact value than Keras'
float32 sums); the rescaling is one elementwise product in the array's own
library, computed in the norms' float32/float64 and rounded once to ``w``'s
dtype.  Constraints are pure functions (``w`` is untouched): in torch, apply
one as ``with torch.no_grad(): w.copy_(c(w))``.

``serialize(c)`` / ``deserialize(d)`` / ``get(identifier)`` follow
``keras.constraints``: ``{"class_name": "MaxNorm", "config": {...}}``, plain
JSON values only.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import array_api_compat as aac
import numpy as np

from ._api import clip_by_value, norm

__all__ = [
    "EPSILON",
    "Constraint",
    "MaxNorm",
    "MinMaxNorm",
    "NonNeg",
    "UnitNorm",
    "deserialize",
    "get",
    "serialize",
]

#: Keras' ``backend.epsilon()`` default, added to the norm in every rescaling.
EPSILON = 1e-7


def _real(value: Any, name: str, where: str, *, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"fastclip.constraints.{where}: {name} must be a real number, got {value!r}"
        )
    v = float(value)
    if math.isnan(v) or not lo <= v <= hi:
        raise ValueError(
            f"fastclip.constraints.{where}: {name} must be in [{lo}, {hi}], got {value!r}"
        )
    return v


def _axis(axis: Any, where: str) -> int | list[int] | None:
    """Keras' ``axis``: None (every axis), an int or a list of ints (JSON-friendly)."""
    if axis is None:
        return None
    if isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
        return int(axis)
    if isinstance(axis, (list, tuple)) and all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axis
    ):
        return [int(a) for a in axis]
    raise TypeError(
        f"fastclip.constraints.{where}: axis must be None, an int or a list of ints, got {axis!r}"
    )


def _rescaled(w: Any, axis: int | list[int] | None, desired: Any) -> Any:
    """``w * desired(n) / (eps + n)`` with the norms ``n`` over ``axis``."""
    ax = tuple(axis) if isinstance(axis, list) else axis
    n = norm(w, 2, axis=ax, keepdims=True)
    xp = aac.array_namespace(n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        f = desired(xp, n) / (EPSILON + n)
        if xp.isdtype(w.dtype, "complex floating") or w.dtype == f.dtype:
            return w * f  # one pass: float32 and float64 weights
        # 16-bit weights: the product in the norms' float32, rounded once to w's dtype
        return xp.astype(xp.astype(w, f.dtype) * f, w.dtype)


class Constraint:
    """Base class: a callable ``w -> constrained w`` with a JSON-able config.

    ``from_config(c.get_config())`` rebuilds an equal constraint (Keras'
    ``Constraint.from_config`` is ``cls(**config)``).
    """

    def __call__(self, w: Any) -> Any:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments as plain JSON values."""
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Constraint:
        """``cls(**config)``: the inverse of :meth:`get_config`."""
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.get_config() == self.get_config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(sorted(self.get_config().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class MaxNorm(Constraint):
    r"""Cap the L2 norm of each unit at ``max_value`` (Keras ``MaxNorm``).

    .. math:: w \leftarrow w\,\frac{\mathrm{clip}(n, 0, c)}{\epsilon + n},
              \quad n = \|w\|_2 \text{ over } \texttt{axis},\ \epsilon = 10^{-7}

    As Keras, a unit below the cap is still multiplied by ``n / (eps + n)``
    (a relative change of about ``1e-7 / n``); use :func:`fastclip.clip_by_norm`
    for the clip that leaves such units exactly as they are.

    Parameters
    ----------
    max_value : float, default 2
        ``c >= 0``.
    axis : int, list of int or None, default 0
        Reduction axes of the norm (Keras' meaning); None: the whole array.

    References
    ----------
    Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
    Overfitting", JMLR 2014 (max-norm regularisation); Keras
    ``keras.constraints.MaxNorm``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.constraints import MaxNorm
    >>> w = np.array([[3.0, 0.1], [4.0, 0.0]])  # Dense kernel [in, out]: 2 units
    >>> MaxNorm(1.0)(w).round(6)
    array([[0.6, 0.1],
           [0.8, 0. ]])
    >>> MaxNorm(1.0).get_config()
    {'max_value': 1.0, 'axis': 0}
    """

    def __init__(self, max_value: float = 2, axis: int | list[int] | None = 0) -> None:
        self.max_value = _real(max_value, "max_value", "MaxNorm")
        self.axis = _axis(axis, "MaxNorm")

    def __call__(self, w: Any) -> Any:
        c = self.max_value
        return _rescaled(w, self.axis, lambda xp, n: xp.clip(n, 0.0, c))

    def get_config(self) -> dict[str, Any]:
        return {"max_value": self.max_value, "axis": self.axis}


class MinMaxNorm(Constraint):
    r"""Keep the L2 norm of each unit in ``[min_value, max_value]`` (Keras ``MinMaxNorm``).

    .. math:: d = r\,\mathrm{clip}(n, a, b) + (1 - r)\,n, \qquad
              w \leftarrow w\,\frac{d}{\epsilon + n}

    ``rate`` ``r = 1`` enforces the interval at once; ``r < 1`` moves the norm a
    fraction ``r`` of the way towards it at each call.  A zero unit stays zero.

    Parameters
    ----------
    min_value, max_value : float, default 0.0, 1.0
        ``0 <= a <= b``.
    rate : float, default 1.0
        ``0 <= r <= 1``.
    axis : int, list of int or None, default 0
        Reduction axes of the norm (Keras' meaning); None: the whole array.

    References
    ----------
    Keras ``keras.constraints.MinMaxNorm``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.constraints import MinMaxNorm
    >>> w = np.array([[0.3, 3.0], [0.4, 4.0]])  # unit norms 0.5 and 5
    >>> MinMaxNorm(1.0, 2.0)(w).round(6)
    array([[0.6, 1.2],
           [0.8, 1.6]])
    >>> MinMaxNorm(1.0, 2.0, rate=0.5)(w).round(6)  # norms 0.75 and 3.5
    array([[0.45, 2.1 ],
           [0.6 , 2.8 ]])
    """

    def __init__(
        self,
        min_value: float = 0.0,
        max_value: float = 1.0,
        rate: float = 1.0,
        axis: int | list[int] | None = 0,
    ) -> None:
        self.min_value = _real(min_value, "min_value", "MinMaxNorm")
        self.max_value = _real(max_value, "max_value", "MinMaxNorm", lo=self.min_value)
        self.rate = _real(rate, "rate", "MinMaxNorm", hi=1.0)
        self.axis = _axis(axis, "MinMaxNorm")

    def __call__(self, w: Any) -> Any:
        a, b, r = self.min_value, self.max_value, self.rate
        return _rescaled(w, self.axis, lambda xp, n: r * xp.clip(n, a, b) + (1.0 - r) * n)

    def get_config(self) -> dict[str, Any]:
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "rate": self.rate,
            "axis": self.axis,
        }


class UnitNorm(Constraint):
    r"""Rescale each unit to (almost) unit L2 norm (Keras ``UnitNorm``).

    .. math:: w \leftarrow \frac{w}{\epsilon + n}

    Parameters
    ----------
    axis : int, list of int or None, default 0
        Reduction axes of the norm (Keras' meaning); None: the whole array.

    References
    ----------
    Keras ``keras.constraints.UnitNorm``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.constraints import UnitNorm
    >>> UnitNorm()(np.array([[3.0], [4.0]])).round(6)
    array([[0.6],
           [0.8]])
    """

    def __init__(self, axis: int | list[int] | None = 0) -> None:
        self.axis = _axis(axis, "UnitNorm")

    def __call__(self, w: Any) -> Any:
        return _rescaled(w, self.axis, lambda xp, n: xp.ones_like(n))

    def get_config(self) -> dict[str, Any]:
        return {"axis": self.axis}


class NonNeg(Constraint):
    r"""Zero the negative weights (Keras ``NonNeg``): :math:`w \leftarrow \max(w, 0)`.

    :func:`fastclip.clip_by_value` with ``min=0`` (its fast route).  Keras
    computes ``w * (w >= 0)``: the same values, except that Keras turns
    ``-inf`` into NaN (``-inf * 0``) and negatives into ``-0.0``; here
    ``-inf`` becomes 0 and negatives ``+0.0``.  NaN stays NaN in both.

    References
    ----------
    Keras ``keras.constraints.NonNeg``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.constraints import NonNeg
    >>> NonNeg()(np.array([-1.0, 0.5, 2.0]))
    array([0. , 0.5, 2. ])
    """

    def __call__(self, w: Any) -> Any:
        return clip_by_value(w, 0.0, None)


_CLASSES: dict[str, type[Constraint]] = {
    "MaxNorm": MaxNorm,
    "MinMaxNorm": MinMaxNorm,
    "NonNeg": NonNeg,
    "UnitNorm": UnitNorm,
    # keras.constraints' snake-case aliases
    "max_norm": MaxNorm,
    "min_max_norm": MinMaxNorm,
    "non_neg": NonNeg,
    "unit_norm": UnitNorm,
}


def serialize(constraint: Constraint) -> dict[str, Any]:
    """``{"class_name": ..., "config": constraint.get_config()}`` (Keras' layout).

    Examples
    --------
    >>> import json
    >>> from fastclip.constraints import MinMaxNorm, deserialize, serialize
    >>> d = serialize(MinMaxNorm(0.5, 2.0, rate=0.9, axis=[0, 1, 2]))
    >>> d["config"]
    {'min_value': 0.5, 'max_value': 2.0, 'rate': 0.9, 'axis': [0, 1, 2]}
    >>> deserialize(json.loads(json.dumps(d)))
    MinMaxNorm(min_value=0.5, max_value=2.0, rate=0.9, axis=[0, 1, 2])
    """
    if not isinstance(constraint, Constraint):
        raise TypeError(
            f"fastclip.constraints.serialize: expected a Constraint, got {constraint!r}"
        )
    return {"class_name": type(constraint).__name__, "config": constraint.get_config()}


def deserialize(config: dict[str, Any]) -> Constraint:
    """The constraint a :func:`serialize` dict describes."""
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(
            "fastclip.constraints.deserialize: expected {'class_name': ..., 'config': {...}}, "
            f"got {config!r}"
        )
    cls = _CLASSES.get(config["class_name"])
    if cls is None:
        raise ValueError(
            f"fastclip.constraints.deserialize: unknown class_name {config['class_name']!r}; "
            f"known: {sorted(_CLASSES)}"
        )
    return cls.from_config(dict(config.get("config") or {}))


def get(identifier: Any) -> Constraint | None:
    """None, a Constraint, a class name or alias (``"max_norm"``), or a serialized dict."""
    if identifier is None or isinstance(identifier, Constraint):
        return identifier
    if isinstance(identifier, str):
        return deserialize({"class_name": identifier, "config": {}})
    if isinstance(identifier, dict):
        return deserialize(identifier)
    raise TypeError(f"fastclip.constraints.get: cannot interpret {identifier!r} as a constraint")
