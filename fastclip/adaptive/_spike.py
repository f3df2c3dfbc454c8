"""SPAM's element-wise spike clip against second-moment estimates, as functions."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _dispatch
from ._adagc import named_errors
from ._base import check_writable, real_param

__all__ = ["spike_clip", "spike_clip_"]


def _pairs(
    grads: Any, exp_avg_sq: Any, threshold: Any, what: str
) -> tuple[list[Any], list[Any], float]:
    gs = _dispatch.as_array_list(grads)
    vs = _dispatch.as_array_list(exp_avg_sq)
    theta = named_errors(what, lambda: real_param(threshold, "threshold", ge=0))
    if len(gs) != len(vs):
        raise ValueError(f"{what}: {len(gs)} gradients for {len(vs)} second moments")
    for i, (g, v) in enumerate(zip(gs, vs)):
        if tuple(g.shape) != tuple(v.shape):
            raise ValueError(
                f"{what}: gradient {i} has shape {tuple(g.shape)}, its second moment "
                f"{tuple(v.shape)}"
            )
    return gs, vs, theta


def _clipped(g: Any, v: Any, theta: float) -> tuple[Any, Any]:
    """(the clipped gradient, its mask): SPAM's ``g[mask] = sign(g) sqrt(theta v)``
    where ``g**2 > theta v``, elementwise as the reference computes it."""
    import array_api_compat as aac

    xp = aac.array_namespace(g, v)
    bound = v * theta
    mask = g * g > bound
    return xp.where(mask, xp.sign(g) * xp.sqrt(bound), g), mask


def spike_clip(grads: Any, exp_avg_sq: Any, threshold: float = 5000.0) -> tuple[list[Any], int]:
    r"""SPAM's spike clip: entries with :math:`g^2 > \theta v` become
    :math:`\mathrm{sign}(g)\sqrt{\theta v}`.

    Huang et al. (2025), "SPAM: Spike-Aware Adam with Momentum Reset for
    Stable LLM Training", arXiv:2501.06842, section 3 (the masked assignment of
    ``galore_torch/SPAM.py``, github.com/TianjinYellow/SPAM-Optimizer), for use
    with any optimizer's second-moment estimates :math:`v` (Adam's
    ``exp_avg_sq`` *before* this step's update).
    :class:`fastclip.torch.SPAMAdamW` applies it inside its step.

    Parameters
    ----------
    grads, exp_avg_sq : array or sequence of arrays
        Gradients and their second moments, pairwise of one shape, any Array
        API library (NumPy, torch, ...).
    threshold : float, default 5000
        :math:`\theta \ge 0`.

    Returns
    -------
    (list of arrays, int)
        New clipped gradients and the number of entries clipped.  A NaN
        gradient entry is never clipped (``NaN**2 > x`` is False), an infinite
        one is (to a finite bound where :math:`v` is finite).

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.adaptive import spike_clip
    >>> g, v = np.array([0.5, -30.0, 2.0]), np.array([0.01, 0.01, 0.01])
    >>> spike_clip([g], [v], threshold=100.0)  # bound sqrt(100 * 0.01) = 1
    ([array([ 0.5, -1. ,  1. ])], 2)
    """
    gs, vs, theta = _pairs(grads, exp_avg_sq, threshold, "fastclip.adaptive.spike_clip")
    out, count = [], 0
    with np.errstate(over="ignore", invalid="ignore"):
        for g, v in zip(gs, vs):
            c, mask = _clipped(g, v, theta)
            out.append(c)
            count += int(_sum(mask))
    return out, count


def spike_clip_(grads: Any, exp_avg_sq: Any, threshold: float = 5000.0) -> int:
    """In-place :func:`spike_clip`: writes the clipped entries into ``grads``,
    returns how many.  Every gradient is checked (writable, no shared memory)
    and every clipped value computed before the first write.

    Examples
    --------
    >>> import numpy as np
    >>> from fastclip.adaptive import spike_clip_
    >>> g = np.array([3.0, 0.1])
    >>> spike_clip_([g], [np.array([1.0, 1.0])], threshold=4.0), g
    (1, array([2. , 0.1]))
    """
    what = "fastclip.adaptive.spike_clip_"
    gs, vs, theta = _pairs(grads, exp_avg_sq, threshold, what)
    if gs:
        check_writable(gs, what)
    with np.errstate(over="ignore", invalid="ignore"):
        results = [_clipped(g, v, theta) for g, v in zip(gs, vs)]
    count = 0
    for g, (c, mask) in zip(gs, results):
        _write(g, c)
        count += int(_sum(mask))
    return count


def _sum(mask: Any) -> Any:
    import array_api_compat as aac

    xp = aac.array_namespace(mask)
    return xp.sum(xp.astype(mask, xp.int64))


def _write(g: Any, values: Any) -> None:
    import array_api_compat as aac

    if aac.is_torch_array(g):
        g.detach().copy_(values)
    else:
        g[...] = values
