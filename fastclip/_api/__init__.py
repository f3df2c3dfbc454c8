"""The public functions of ``fastclip``: validation, numpydoc, one backend call each.

``_norms`` (norm, global_norm, clip_coefficient), ``_clip`` (one array: by
value, by norm, normalize), ``_global`` (many arrays: global norm, scale_,
clip_values_), ``_per_sample`` (clip_per_sample), ``_peer_clips`` (optax's
clip_by_block_rms, TensorFlow's clip_by_average_norm) and ``_bounds``
(array-valued bounds of clip_by_value and clip_by_norm).  Every function checks all
its arguments and arrays before the first write, then hands the work to the
backend ``fastclip._dispatch`` binds for its arrays.
"""

from ._clip import clip_by_norm, clip_by_norm_, clip_by_value, clip_by_value_, normalize, normalize_
from ._global import clip_by_global_norm, clip_by_global_norm_, clip_values_, scale_
from ._norms import clip_coefficient, global_norm, norm
from ._peer_clips import (
    clip_by_average_norm,
    clip_by_average_norm_,
    clip_by_block_rms,
    clip_by_block_rms_,
)
from ._per_sample import PerSampleClipResult, clip_per_sample

__all__ = [
    "PerSampleClipResult",
    "clip_by_average_norm",
    "clip_by_average_norm_",
    "clip_by_block_rms",
    "clip_by_block_rms_",
    "clip_by_global_norm",
    "clip_by_global_norm_",
    "clip_by_norm",
    "clip_by_norm_",
    "clip_by_value",
    "clip_by_value_",
    "clip_coefficient",
    "clip_per_sample",
    "clip_values_",
    "global_norm",
    "norm",
    "normalize",
    "normalize_",
    "scale_",
]

# Docs, reprs and pickles show the public path (as torch sets
# ``clip_grad_norm_.__module__ = "torch.nn.utils"``); clip_values_ stays private.
for _name in __all__:
    if _name != "clip_values_":
        globals()[_name].__module__ = "fastclip"
del _name
