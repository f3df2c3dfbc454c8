"""Value clipping of many arrays at once on the CPU route (``clip_values_``).

Floating-point lists take one kernel launch per dtype (``_core.clamp_many_``,
through the packed address tables); a list with integer or bool arrays is
checked whole first (every target writeable, numeric, without stride-0
self-overlap, no two sharing memory) and then clamped array by array.
"""

from __future__ import annotations

from typing import Any

from .._errors import out_of_place_hint
from .._memory import check_disjoint, check_self_overlap
from . import _core


def check_value_targets(lib: Any, arrays: list[Any]) -> None:
    """What clip_by_value_ checks for each array, for all of them before any is written."""
    views = []
    for a in arrays:
        if lib.name == "torch" and not a.is_cpu:
            raise TypeError(
                f"all tensors in one call must be on one device, got cpu and {a.device}"
            )
        if not lib.writeable(a):
            raise ValueError(
                f"clip_by_value_ got a read-only array; {out_of_place_hint('clip_by_value')}"
            )
        sv = lib.storage(a)
        if sv.dtype.kind not in "biuf":
            raise TypeError(
                f"clip_by_value needs numeric arrays (bool, integer or floating), got {sv.dtype}"
            )
        if not sv.flags.c_contiguous:
            check_self_overlap(sv.shape, sv.strides, "clip_by_value")
        views.append(sv)
    check_disjoint(views)


def clamp_many_(lib: Any, arrays: list[Any], lo: float | None, hi: float | None) -> None:
    """All-float lists: one launch per dtype; otherwise every array is checked,
    then clamped one by one."""
    if all(lib.is_float(a) for a in arrays):
        _core.clamp_many_(lib, arrays, lo, hi)
        return
    check_value_targets(lib, arrays)
    for a in arrays:
        _core.clip_by_value(lib, a, lo, hi, True)
