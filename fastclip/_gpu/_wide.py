"""The GPU route's float64-accumulating global norm (``norm64``), for
``fastclip.distributed``'s local norm.

The route's own norm (``Packed.finish``) sums float32 and 16-bit elements in
float32 per thread; which elements share a thread depends on the arrays'
sizes, so a model split 2 ways and 4 ways gets differently rounded norms.
``fastclip_partial_pow_sum_wide`` widens every element to float64 before it
adds it (every ord, every dtype), reading the same device tables as the
route's other kernels: one launch per dtype and one ``fastclip_finish_wide``,
no copies, and the result stays a float64 0-d array in device memory (NCCL
reduces device tensors; nothing is read back to the host).

Overflow (the CPU route's ``robust_norm`` rule, ``fastclip/_formulas.py``):
where a float64 power sum can leave ``(SAFE_LO, SAFE_HI)`` -- any p other
than 1, 2 and inf, and L2 when a float64 array is present; widened squares of
float32 and 16-bit values (below 1.2e77, above 2e-90 when not zero) cannot --
the finish runs in three stages around two more partial launches per dtype
(the max |x|, then the sum of (|x| * 2**k)**p) whose blocks return at once
unless the device found the total out of range.  The device decides, so the
host never waits (see ``wide_kernels.cu``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _config as cfg
from .._formulas import SAFE_HI, SAFE_LO, needs_rescale
from . import _adapters, _modules
from ._modules import ELEMENT_TYPES
from ._tables import Packed, grid_size, ptr, ptr_or_null, u64

__all__ = ["norm64", "wide_norm"]


def norm64(
    lib: Any,
    arrays: Sequence[Any],
    ord_code: int,
    p: float,
    checked: Any = None,
    wide: bool = True,
) -> Any:
    """The global norm of ``arrays`` as a float64 0-d device array of ``lib``'s
    library, every element accumulated in float64 (``wide`` is accepted for the
    CPU route's signature: the GPU route has only this one float64 norm).

    ``checked``: a :class:`Packed` of exactly ``arrays`` (from ``check_targets``),
    reused instead of packing them again.
    """
    with _adapters.on_device(lib, arrays[0]):
        packed = (
            checked if isinstance(checked, Packed) else Packed(lib, arrays, "norm", writing=False)
        )
        return wide_norm(packed, ord_code, p)


def _partials(
    packed: Packed, partials: Any, ord_code: int, p: float, mode: int, state: Any
) -> None:
    """One ``fastclip_partial_pow_sum_wide`` launch per dtype (``mode``: see wide_kernels.cu)."""
    lib, base, offset = packed.lib, packed.lib.ptr(partials), 0
    for g in packed.groups:
        if g.n_chunks:
            k = _modules.kernel(
                "wide", packed.device, "fastclip_partial_pow_sum_wide", ELEMENT_TYPES[g.kind]
            )
            grid = grid_size(g.n_chunks, cfg.GPU_MAX_BLOCKS)
            args = (
                g.ptrs,
                g.sizes,
                g.chunk_tensor,
                g.chunk_start,
                np.int64(g.n_chunks),
                np.int64(cfg.GPU_CHUNK),
                np.int32(ord_code),
                np.float64(p),
                np.int32(mode),
                ptr_or_null(lib, state),
                u64(base + 8 * offset),
            )
            k((grid,), (cfg.GPU_BLOCK,), args)
        offset += g.n_chunks


def _finish(
    packed: Packed,
    partials: Any,
    n: int,
    ord_code: int,
    p: float,
    stage: int,
    state: Any,
    norm: Any,
) -> None:
    """One ``fastclip_finish_wide`` launch (one block; ``stage``: see wide_kernels.cu)."""
    lib = packed.lib
    k = _modules.kernel("wide", packed.device, "fastclip_finish_wide", ELEMENT_TYPES["float64"])
    args = (
        ptr(partials, lib),
        np.int64(n),
        np.int32(ord_code),
        np.float64(p),
        np.int32(stage),
        np.float64(SAFE_LO),
        np.float64(SAFE_HI),
        ptr_or_null(lib, state),
        ptr(norm, lib),
    )
    k((1,), (cfg.GPU_FINISH_BLOCK,), args)


def wide_norm(packed: Packed, ord_code: int, p: float) -> Any:
    """The float64 0-d norm of a packed call's arrays on its device (see the module
    docstring): 1 + (number of dtypes) launches, 3 + 3 x that where the power sum
    may need rescaling."""
    lib, like = packed.lib, packed.like
    n = sum(g.n_chunks for g in packed.groups)
    partials = lib.empty((max(1, n),), "float64", like)
    norm = lib.empty((), "float64", like)
    if not needs_rescale(ord_code, packed.norm_kind == "float64"):
        _partials(packed, partials, ord_code, p, 0, None)
        _finish(packed, partials, n, ord_code, p, 0, None, norm)
        return norm
    # One partials buffer serves the three passes: each finish stage consumes the
    # partials before the next pass (same stream) overwrites them.
    state = lib.empty((2,), "float64", like)
    for mode in (0, 1, 2):
        _partials(packed, partials, ord_code, p, mode, state)
        _finish(packed, partials, n, ord_code, p, mode + 1, state, norm)
    return norm
