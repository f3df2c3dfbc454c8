"""AGC: unit-wise adaptive gradient clipping."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .. import _api, _dispatch
from .._formulas import clip_coefficients
from .._libraries import wide_dtype
from .._validate import check_eps
from ._base import Clipper, check_writable, copies, ord_value, real_param

__all__ = ["AGC"]

_LAYOUTS = ("torch", "optax", "optax-legacy")


def _agc_axis(axis: Any) -> str | tuple[int, ...]:
    """A layout name, or explicit reduction axes as a tuple of distinct ints (a
    list too: ``state_dict`` stores them as one)."""
    if isinstance(axis, str):
        if axis.lower() not in _LAYOUTS:
            raise ValueError(
                "fastclip.adaptive.AGC: axis must be 'torch', 'optax', 'optax-legacy' or "
                f"reduction axes, got {axis!r}"
            )
        return axis.lower()
    items = (axis,) if isinstance(axis, numbers.Integral) else axis
    if not isinstance(items, (tuple, list)) or not all(
        isinstance(a, numbers.Integral) and not isinstance(a, (bool, np.bool_)) for a in items
    ):
        raise TypeError(
            "fastclip.adaptive.AGC: axis must be 'torch', 'optax', 'optax-legacy', an int or "
            f"a tuple of ints, got {axis!r}"
        )
    out = tuple(int(a) for a in items)
    if len(set(out)) != len(out):
        raise ValueError(f"axis must not repeat an axis, got {axis!r}")
    return out


class AGC(Clipper):
    r"""Adaptive gradient clipping, unit-wise (Brock, De, Smith, Simonyan 2021).

    "High-Performance Large-Scale Image Recognition Without Normalization",
    arXiv:2102.06171, section 4 [1]_.  For every *unit* :math:`i` of a parameter
    :math:`W` (a row of output channels, see ``axis``) with gradient :math:`G`:

    .. math::

        m_i = \lambda\,\max(\|W_i\|_F, \epsilon), \qquad
        G_i \leftarrow G_i \cdot \min\Big(1, \frac{m_i}{\max(\|G_i\|_F, 10^{-6})}\Big)

    (equal to timm's and optax's ``where(||G_i|| < m_i, G_i, G_i m_i /
    max(||G_i||, 1e-6))``, NaN included).  The paper recommends not clipping
    the final classifier layer: pass only the parameters to clip.

    Parameters
    ----------
    clipping : float, default 0.01
        :math:`\lambda`, finite and > 0.
    eps : float, default 1e-3
        Floor of the parameter norm (so zero-initialised weights can move).
    axis : {"torch", "optax", "optax-legacy"} or int or tuple of int, default "torch"
        How a tensor splits into units:

        - ``"torch"`` (timm's ``unitwise_norm``, output-first layouts
          ``[out, in]``, ``[out, in, kh, kw]``): one unit per index of axis 0,
          norm over all other axes; arrays with ``ndim <= 1`` are one unit;
        - ``"optax"`` (optax >= 0.2.7 ``unitwise_norm`` with ``axis=None``,
          JAX/Keras ``[in, out]``, ``HWIO`` and ``DHWIO`` kernels): squeezed
          ``ndim <= 1`` one unit; ``ndim`` 2 or 3 reduce axis 0; ``ndim`` 4
          reduce axes (0, 1, 2); ``ndim`` 5 (Conv3D) reduce axes (0, 1, 2, 3);
          higher ranks raise, as optax does;
        - ``"optax-legacy"`` (optax <= 0.2.6): the same for ranks <= 4, and a
          5-D array raises ValueError as those versions did (to reproduce an
          old run exactly);
        - explicit reduction axes for every array with ``ndim >= 2`` (optax's
          ``axis=`` argument; fastclip keeps ``ndim <= 1`` arrays one unit).
    ord : float, default 2
        Order of the unit norms (timm's ``norm_type``).
    nonfinite : {"propagate", "error", "skip"}
        Applied to the total gradient norm (see the module docstring).

    Returns (from a call)
    ---------------------
    The global norm of the gradients before clipping, computed from the unit
    norms (no extra pass).

    References
    ----------
    .. [1] A. Brock, S. De, S. L. Smith, K. Simonyan, "High-Performance
       Large-Scale Image Recognition Without Normalization", ICML 2021.
       https://arxiv.org/abs/2102.06171

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.adaptive import AGC
    >>> w = np.array([[1.0, 0.0], [0.0, 10.0]], np.float32)  # two output units
    >>> g = np.array([[3.0, 4.0], [0.0, 0.05]], np.float32)
    >>> agc = AGC(clipping=0.1)
    >>> round(float(agc([g], [w])), 5)
    5.00025
    >>> g  # unit 0: |g| = 5 > 0.1 * 1, scaled to norm 0.1; unit 1 kept
    array([[0.06, 0.08],
           [0.  , 0.05]], dtype=float32)
    """

    def __init__(
        self,
        clipping: float = 0.01,
        eps: float = 1e-3,
        axis: str | int | tuple[int, ...] = "torch",
        ord: float = 2,
        *,
        nonfinite: str = "propagate",
    ) -> None:
        self.clipping = real_param(clipping, "clipping", gt=0)
        self.eps = check_eps(eps)
        self.axis: Any = _agc_axis(axis)
        self.ord = ord_value(ord)
        self._init_common(nonfinite)

    def _config(self) -> dict[str, Any]:
        axis = self.axis if isinstance(self.axis, str) else list(self.axis)
        return dict(
            clipping=self.clipping, eps=self.eps, axis=axis, ord=self.ord, nonfinite=self.nonfinite
        )

    def unit_axes(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The reduction axes of one array's unit norms (None: the whole array is one unit)."""
        ndim = len(shape)
        if self.axis == "torch":
            return None if ndim <= 1 else tuple(range(1, ndim))
        if self.axis in ("optax", "optax-legacy"):
            # optax's unitwise_norm (optax/transforms/_clipping.py): the squeezed-vector
            # test comes first, then the rank; the rank-5 (DHWIO) rule came with
            # https://github.com/google-deepmind/optax/pull/1576 (Jan 2026).
            if sum(1 for s in shape if s != 1) <= 1:
                return None
            if ndim in (2, 3):
                return (0,)
            if ndim == 4:
                return (0, 1, 2)
            if ndim == 5 and self.axis == "optax":
                return (0, 1, 2, 3)
            top = 5 if self.axis == "optax" else 4
            raise ValueError(
                f"fastclip.adaptive.AGC(axis={self.axis!r}) handles arrays of rank <= {top} "
                f"(as optax's unitwise_norm), got shape {shape}; pass explicit reduction "
                "axes (axis=(...)) for other shapes"
                + ("" if top == 5 else ", or axis='optax' for Conv3D (DHWIO) kernels")
            )
        return None if ndim <= 1 else self.axis  # type: ignore[no-any-return]

    def _coefficients(self, gs: list[Any], ps: list[Any], xp: Any) -> tuple[list[Any], float, bool]:
        """Per-unit scale factors of every gradient (in its dtype), the power sum of
        all unit norms, and whether any norm is float64."""
        coefs = []
        total = 0.0
        wide = False
        for g, p in zip(gs, ps):
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"AGC: gradient shape {g.shape} != parameter shape {p.shape}")
            axes = self.unit_axes(tuple(g.shape))
            keep = axes is not None
            gn = _api.norm(g, self.ord, axis=axes, keepdims=keep)
            pn = _api.norm(p, self.ord, axis=axes, keepdims=keep)
            wide = wide or gn.dtype == xp.float64
            total = _accumulate(total, gn, self.ord, xp)
            mx = xp.maximum(pn, xp.asarray(self.eps, dtype=pn.dtype)) * self.clipping
            # AGC floors the gradient norm (timm's and optax's max(||G_i||, 1e-6)) where
            # clip_grad_norm_ adds eps: the shared min(1, m / norm) with eps = 0 after
            # the floor (the floored norm is never 0, so the zero-norm rule never applies).
            floor = xp.maximum(gn, xp.asarray(1e-6, dtype=gn.dtype))
            c = clip_coefficients(floor, mx, 0.0, xp=xp)
            coefs.append(xp.astype(c, g.dtype) if c.dtype != g.dtype else c)
        return coefs, total, wide

    def _run(
        self, grads: Any, params: Any, inplace: bool, given: Any = None
    ) -> tuple[list[Any], Any]:
        import array_api_compat as aac

        if params is None:
            raise ValueError("AGC needs the parameters: call agc(grads, params)")
        gs = _dispatch.as_array_list(grads)
        ps = _dispatch.as_array_list(params)
        if len(gs) != len(ps):
            raise ValueError(f"AGC: {len(gs)} gradients for {len(ps)} parameters")
        if not gs:
            self._record(0.0, None, False)
            return [], _api.global_norm([])
        if inplace:
            check_writable(gs, "AGC")
        xp = aac.array_namespace(gs[0])
        # Every coefficient first: a bad gradient or parameter anywhere in the lists
        # raises before the first gradient is scaled.  inf and NaN follow IEEE (as
        # torch's do) without NumPy's overflow warnings.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            coefs, total, wide = self._coefficients(gs, ps, xp)
        value = _finish(total, self.ord) if given is None else float(given)
        total_arr = xp.asarray(value, dtype=xp.float64 if wide else xp.float32)
        if not math.isfinite(value) and self._nonfinite(value):
            out = gs if inplace else copies(gs)
            self._record(value, None, True)
            return out, total_arr
        if inplace:
            for g, c in zip(gs, coefs):
                if aac.is_torch_array(g):
                    # detach(): a gradient that requires grad would refuse mul_ (the
                    # core's kernels write its memory the same way)
                    g.detach().mul_(c)
                else:
                    g *= c
            out = gs
        else:
            out = [g * c for g, c in zip(gs, coefs)]
        self.step += 1
        self._record(value, None, False)
        return out, total_arr


def _accumulate(total: float, norms: Any, ord: float, xp: Any) -> float:
    """Add unit norms to a running power sum (max for inf), in float64."""
    if math.isinf(ord):
        if math.prod(norms.shape) == 0:  # no units (a zero-size gradient): nothing to add
            return total
        m = float(xp.max(norms))
        return math.nan if (math.isnan(m) or math.isnan(total)) else max(total, m)
    return total + float(xp.sum(xp.astype(norms, wide_dtype(xp)) ** ord))


def _finish(total: float, ord: float) -> float:
    if math.isinf(ord) or ord == 1:
        return total
    if ord == 2:
        return math.sqrt(total)
    try:
        return float(total ** (1.0 / ord))
    except OverflowError:  # ord < 1: a huge power sum's root can pass the float range
        return math.inf
