"""What the GPU route offers callers that reduce norms themselves (``fastclip.distributed``).

``check_targets`` makes every check of an in-place global clip (dtypes, one
device, no shared memory) before anything is written or launched, and returns
the packed tables so that ``norm64`` (``_wide.py``) does not pack them twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import _adapters, _tables


def check_targets(lib: Any, arrays: Sequence[Any], what: str) -> _tables.Packed:
    """Validate in-place targets (nothing written or launched); the packed tables,
    for ``norm64``."""
    with _adapters.on_device(lib, arrays[0]):
        return _tables.Packed(lib, arrays, what, writing=True)
