"""Value clipping of many arrays at once on the GPU route (``clip_values_``).

Floating-point lists take one kernel launch per dtype (``_core.clamp_many_``);
a list with integer or bool arrays is checked whole first (supported dtypes, no
stride-0 self-overlap) and then clamped array by array.
"""

from __future__ import annotations

from typing import Any

from .._memory import check_self_overlap
from . import _core


def check_value_targets(lib: Any, arrays: list[Any]) -> None:
    """What clip_by_value_ checks for each array, for all of them before any is written."""
    for a in arrays:
        if lib.is_float(a) and lib.kind(a) is None:
            raise TypeError(f"clip_by_value on the GPU does not support {a.dtype}")
        if not lib.contiguous(a):
            check_self_overlap(tuple(a.shape), lib.strides(a), "clip_by_value")


def clamp_many_(lib: Any, arrays: list[Any], lo: float | None, hi: float | None) -> None:
    """All-float lists: one launch per dtype; otherwise every array is checked,
    then clamped one by one."""
    if all(lib.is_float(a) for a in arrays):
        _core.clamp_many_(lib, arrays, lo, hi)
        return
    check_value_targets(lib, arrays)
    for a in arrays:
        _core.clip_by_value(lib, a, lo, hi, True)
