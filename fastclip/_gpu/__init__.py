"""TEMPORARY face (replaced by the GPU split when merged)."""

from ._driver import clip_by_value, clip_global, global_norm, norm, rescale, scale_  # noqa: F401
from ._fused_step import adamw_step_, sgd_step_, step_plan, step_prepare, step_run  # noqa: F401
from ._libs import lib_for  # noqa: F401
from ._per_sample import clip_per_sample_gpu as clip_per_sample  # noqa: F401
from ._targets import check_targets  # noqa: F401
from ._value_clip import clamp_many_  # noqa: F401
