"""``ClippedOptimizer``'s checkpoint layout: the parts of a state dict and the
checks a load makes before it writes anything.

Used by ``_clipped.py`` only.  Imports nothing from torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["CLIPPER_KEY", "check_clipper_part", "split"]

#: The key of the clipper's state in :meth:`ClippedOptimizer.state_dict`.
CLIPPER_KEY = "fastclip_clipper"


def split(state_dict: Any) -> tuple[Any, Any, bool]:
    """(optimizer part, clipper part, has a clipper part) of either layout: torch's
    ``"state"`` / ``"param_groups"`` plus :data:`CLIPPER_KEY`, or the earlier
    ``{"optimizer", "clipper"}``."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "state_dict must be a dict (what ClippedOptimizer.state_dict() returns), "
            f"got {type(state_dict).__name__}"
        )
    keys = sorted(map(str, state_dict))
    if "optimizer" in state_dict and "state" not in state_dict:  # the earlier layout
        extra = set(state_dict) - {"optimizer", "clipper"}
        if extra:
            raise ValueError(
                "the {'optimizer', 'clipper'} layout has no other keys, got "
                f"unexpected keys {sorted(map(str, extra))}"
            )
        return state_dict["optimizer"], state_dict.get("clipper"), "clipper" in state_dict
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(
            "expected ClippedOptimizer.state_dict()'s layout (torch's 'state' and "
            f"'param_groups' plus {CLIPPER_KEY!r}, or the earlier {{'optimizer', "
            f"'clipper'}}), got keys {keys}"
        )
    inner = {k: v for k, v in state_dict.items() if k != CLIPPER_KEY}
    return inner, state_dict.get(CLIPPER_KEY), CLIPPER_KEY in state_dict


def check_clipper_part(clipper: Any, state_dict: Mapping[Any, Any], has_clipper: bool) -> bool:
    """Refuse a state dict whose clipper part does not fit ``clipper``; returns
    whether the clipper loads one (it has ``load_state_dict``)."""
    loads = hasattr(clipper, "load_state_dict")
    if loads and not has_clipper:
        raise ValueError(
            f"this state dict has no clipper part ({CLIPPER_KEY!r}); it looks like a "
            "plain optimizer's state_dict() (keys "
            f"{sorted(map(str, state_dict))}). Load it into the wrapped optimizer with "
            "opt.optimizer.load_state_dict(sd) (the clipper keeps its state), or pass "
            "ClippedOptimizer.state_dict()'s output"
        )
    if has_clipper and not loads:
        raise ValueError(
            f"this state dict has a clipper part but {type(clipper).__name__} has "
            "no load_state_dict"
        )
    return loads
