"""The generic route: pure Array API code for every other library.

array-api-strict, JAX, torch on devices other than CPU/CUDA, ... come here
through ``array_api_compat.array_namespace``; the route's adapter is that namespace (``xp``), passed first to every
operation as the other routes pass theirs.  Correct, not fast: sums in float64
where the namespace has it, results in the input's namespace and on its device.
"""

from ._ops import (
    check_all_writeable,
    check_targets,
    check_value_targets,
    check_writeable,
    clamp_many_,
    clip_by_value,
    clip_global,
    global_norm,
    norm,
    rescale,
    scale_,
    wide_dtype,
)
from ._per_sample import clip_per_sample

__all__ = [
    "check_all_writeable",
    "check_targets",
    "check_value_targets",
    "check_writeable",
    "clamp_many_",
    "clip_by_value",
    "clip_global",
    "clip_per_sample",
    "global_norm",
    "norm",
    "rescale",
    "scale_",
    "wide_dtype",
]
