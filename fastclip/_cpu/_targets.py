"""What the CPU route offers callers that reduce norms themselves (``fastclip.distributed``).

``check_targets`` makes every check of an in-place global clip before anything
is written, and returns the packed address tables so that the norm is not
packed twice; ``norm64`` is the route's exact float64 host norm of many arrays
(over/underflow-safe, not rounded to the arrays' dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._pack import pack


def check_targets(lib: Any, arrays: Sequence[Any], what: str) -> Any:
    """Validate in-place targets (nothing written); the packed tables, for ``norm64``."""
    return pack(lib, arrays, what, writing=True)


def norm64(
    lib: Any,
    arrays: Sequence[Any],
    ord_code: int,
    p: float,
    checked: Any = None,
    wide: bool = False,
) -> float:
    """The global norm as a Python float, from float64 power sums (``wide``: every
    element accumulated in float64, see ``Packed.norm``)."""
    packed = checked if checked is not None else pack(lib, arrays, "norm", writing=False)
    return float(packed.norm(ord_code, p, wide))
