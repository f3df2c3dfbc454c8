"""The Array API route refuses a many-array in-place call before its first write.

This file owns the Array API route's write probe; the refusals every route makes are in
tests/api/test_bad_input.py.

array-api-strict arrays over read-only or broadcast NumPy buffers report
themselves writeable, so the route probes each target before writing any:
a refused call leaves every input's bytes as they were, and an accepted one
matches the float64 oracle.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

import fastclip

xp = pytest.importorskip("array_api_strict")


def _targets(kind: str) -> list[object]:
    first = xp.asarray(np.arange(1.0, 4.0) * 10)
    if kind == "broadcast":
        second = xp.broadcast_to(xp.asarray(2.0, dtype=xp.float64), (3,))
    else:
        second = xp.asarray(np.linspace(-1.0, 1.0, 3))
    return [first, second]


def _bytes(arrays: list[object]) -> list[bytes]:
    return [np.asarray(a._array).tobytes() for a in arrays]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "call",
    [
        lambda a: fastclip.clip_by_global_norm_(a, 1.0),
        lambda a: fastclip.scale_(a, 0.5),
    ],
    ids=["clip_by_global_norm_", "scale_"],
)
def test_unwritable_second_target_refused_before_any_write(call) -> None:
    arrays = _targets("broadcast")
    before = _bytes(arrays)
    with pytest.raises(ValueError, match=r"cannot write array 1.*nothing was modified"):
        call(arrays)
    assert _bytes(arrays) == before


def test_writable_targets_still_clipped_to_the_oracle() -> None:
    arrays = _targets("plain")
    copies = [np.asarray(a._array).copy() for a in arrays]  # type: ignore[attr-defined]
    total = fastclip.clip_by_global_norm_(arrays, 1.0)
    want, want_total = ref.clip_by_global_norm(copies, 1.0)
    np.testing.assert_allclose(float(total), float(want_total), rtol=1e-12)
    for a, w in zip(arrays, want):
        np.testing.assert_allclose(np.asarray(a._array), w, rtol=1e-12)  # type: ignore[attr-defined]
    fastclip.scale_(arrays, 0.5)
    for a, w in zip(arrays, want):
        np.testing.assert_allclose(np.asarray(a._array), 0.5 * w, rtol=1e-12)  # type: ignore[attr-defined]
