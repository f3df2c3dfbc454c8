"""TEMPORARY face (replaced by the CPU split when merged)."""

from ._driver import (  # noqa: F401
    clip_by_value,
    clip_global,
    global_norm,
    norm,
    pack,
    rescale,
    run,
    run_with,
    scale_,
    threading_layer,
)
from ._fused_step import adamw_step_, sgd_step_, step_plan, step_prepare, step_run  # noqa: F401
from ._libs import lib_for  # noqa: F401
from ._per_sample import clip_per_sample  # noqa: F401
from ._targets import check_targets, norm64  # noqa: F401
from ._value_clip import clamp_many_  # noqa: F401
