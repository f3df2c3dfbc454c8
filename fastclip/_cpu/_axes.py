"""Per-slice norms and scaling of one array: ``AxisPlan`` (rows, cols or a copy).

Reductions over trailing axes of contiguous data run the ``rows_*`` kernels on a
``[m, k]`` view, over leading axes the ``cols_*`` kernels on a ``[k, m]`` view;
anything else (middle axes, non-contiguous data) is copied in to a contiguous
``[m, k]`` buffer, and an in-place call copies the result out again.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _config as cfg
from .._formulas import SAFE_HI, SAFE_LO, coefficient_parts, needs_rescale, pow2_inverse, root
from ._launch import run


def _as_2d(sv: np.ndarray, shape: tuple[int, int]) -> np.ndarray | None:
    """``sv`` reshaped to ``shape`` without a copy, or None if that needs a copy."""
    r = sv.reshape(shape)
    if r.size == 0 or np.may_share_memory(r, sv):
        return r
    return None


class AxisPlan:
    """How one array is reduced along ``axes``: rows (trailing), cols (leading) or a copy."""

    def __init__(self, sv: np.ndarray, axes: tuple[int, ...]):
        nd = sv.ndim
        kept = tuple(i for i in range(nd) if i not in axes)
        self.kept_shape = tuple(sv.shape[i] for i in kept)
        m = math.prod(self.kept_shape)
        k = math.prod(sv.shape[i] for i in axes)
        self.copied_from: np.ndarray | None = None  # transposed view of the caller's data
        x2 = None
        if axes == tuple(range(nd - len(axes), nd)):
            self.kind = "rows"
            x2 = _as_2d(sv, (m, k))
        elif axes == tuple(range(len(axes))):
            self.kind = "cols"
            x2 = _as_2d(sv, (k, m))
        if x2 is None:  # middle axes or non-contiguous data: copy in
            self.kind = "rows"
            self.copied_from = sv.transpose(kept + axes)
            # Always a fresh buffer: ``scale`` works on it in place, and a transposed
            # view can already be C-contiguous (size-1 axes, channels_last tensors),
            # where ``np.ascontiguousarray`` would hand back the caller's own memory.
            x2 = np.array(self.copied_from, order="C", copy=True).reshape(m, k)
        self.x2 = x2
        self.perm = kept + axes

    def pow_sums(self, ord_code: int, p: float, inv: np.ndarray | None = None) -> np.ndarray:
        n_slices = self.x2.shape[0] if self.kind == "rows" else self.x2.shape[1]
        inv = np.ones(n_slices) if inv is None else inv
        if self.kind == "rows":
            return run("rows_pow_sum", self.x2.size, self.x2, ord_code, p, inv)
        return run("cols_pow_sum", self.x2.size, self.x2, ord_code, p, inv, cfg.COL_TILE)

    def fused_clip(
        self,
        ord_code: int,
        p: float,
        max_norm: float,
        eps: float,
        out_sv: np.ndarray | None,
        wide: bool = False,
    ) -> np.ndarray | None:
        """Norms and clip in one pass over contiguous rows, into ``out_sv`` or in
        place; None where the plan is not such rows (the caller then takes
        ``norms`` and ``scale``).

        ``wide``: float64 rows (``rows_clip_wide``), bit for bit ``norms`` +
        ``coefficient_parts`` + ``scale``: two-factor coefficients in the kernel,
        and the L2 rows whose power sums left (SAFE_LO, SAFE_HI) finished here
        (``_finish_rescaled``); else ``rows_clip`` (one-factor coefficients).
        """
        if self.kind != "rows" or self.copied_from is not None:
            return None
        x2 = self.x2
        dst = x2 if out_sv is None else out_sv.reshape(x2.shape)
        if not wide:
            return run(  # type: ignore[no-any-return]
                "rows_clip", x2.size, x2, dst, ord_code, p, max_norm, eps, dst is x2
            )
        norms, sums, invs = run(
            "rows_clip_wide", x2.size, x2, dst, ord_code, p, max_norm, eps, dst is x2
        )
        rescaled = invs != 0.0
        if rescaled.any():
            norms = self._finish_rescaled(dst, rescaled, norms, sums, invs, p, max_norm, eps)
        return norms  # type: ignore[no-any-return]

    def _finish_rescaled(
        self,
        dst: np.ndarray,
        rescaled: np.ndarray,
        norms: np.ndarray,
        sums: np.ndarray,
        invs: np.ndarray,
        p: float,
        max_norm: float,
        eps: float,
    ) -> np.ndarray:
        """The rows ``rows_clip_wide`` left unscaled: their norms with ``norms``'
        NumPy arithmetic (on arrays of all rows, as there), then their scaling."""
        inv = np.where(rescaled, invs, 1.0)
        norms = np.where(rescaled, root(sums, 3, p) / inv, norms)
        rows = np.flatnonzero(rescaled)
        c, c2 = coefficient_parts(norms[rows], max_norm, eps, "clip")
        x2 = self.x2
        run("rows_scale_at", rows.size * x2.shape[1], x2, dst, rows, c, c2, dst is x2)
        return norms

    def norms(self, ord_code: int, p: float, wide: bool) -> np.ndarray:
        """Norm of every slice, rescaled by its max where power sums over/underflow."""
        totals = self.pow_sums(ord_code, p)
        values = root(totals, ord_code, p)
        if needs_rescale(ord_code, wide):
            bad = ~((totals > SAFE_LO) & (totals < SAFE_HI))
            if bad.any():
                maxes = self.pow_sums(0, p)
                fix = bad & (maxes > 0) & (maxes < math.inf)
                if fix.any():
                    inv = np.where(fix, pow2_inverse(np.where(fix, maxes, 1.0)), 1.0)
                    scaled = root(self.pow_sums(3, p, inv), 3, p) / inv
                    values = np.where(fix, scaled, values)
        return np.asarray(values, np.float64)

    def scale(
        self, coefs: np.ndarray, out_sv: np.ndarray | None, coefs2: np.ndarray | None = None
    ) -> None:
        """Multiply each reduced slice by its coefficient: into ``out_sv`` or in place.

        ``coefs2``: second factors, multiplied in after ``coefs`` (coefficients
        beyond float64's range as two factors, ``coefficient_parts``)."""
        x2 = self.x2
        if self.copied_from is not None:
            run("rows_scale", x2.size, x2, x2, coefs, True)
            if coefs2 is not None:
                run("rows_scale", x2.size, x2, x2, coefs2, True)
            target = self.copied_from if out_sv is None else out_sv.transpose(self.perm)
            target[...] = x2.reshape(target.shape)
            return
        dst = x2 if out_sv is None else out_sv.reshape(x2.shape)
        for i, c in enumerate((coefs, coefs2)):
            if c is None:
                continue
            src = x2 if i == 0 else dst
            if self.kind == "rows":
                run("rows_scale", x2.size, src, dst, c, dst is src)
            else:
                run("cols_scale", x2.size, src, dst, c, dst is src, cfg.COL_TILE)
