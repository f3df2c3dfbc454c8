"""fastclip: fast, exact gradient and weight clipping for any array library.

Norms (any p > 0 or inf), clipping by value, by norm (whole array or per
slice), by global norm over many arrays, normalising, on NumPy arrays and
torch tensors through parallel Numba kernels (zero-copy), and on any other
Array API library through a generic implementation.  ``fastclip.torch`` is a
drop-in for ``torch.nn.utils.clip_grad_norm_`` and friends.

``import fastclip`` imports neither torch, CuPy nor JAX, and compiles nothing:
kernels compile on first use per dtype and are cached on disk.
"""

from . import adaptive, constraints, optim
from ._api import (
    PerSampleClipResult,
    clip_by_average_norm,
    clip_by_average_norm_,
    clip_by_block_rms,
    clip_by_block_rms_,
    clip_by_global_norm,
    clip_by_global_norm_,
    clip_by_norm,
    clip_by_norm_,
    clip_by_value,
    clip_by_value_,
    clip_coefficient,
    clip_per_sample,
    global_norm,
    norm,
    normalize,
    normalize_,
    scale_,
)
from ._errors import CacheWarning, GPUUnavailableError, NonFiniteNormError
from ._info import info
from ._version import __version__
from .adaptive import AGC, AutoClip, GlobalNormClipper, ZClip

info.__module__ = "fastclip"  # the public path in docs and reprs

__all__ = [
    "AGC",
    "AutoClip",
    "CacheWarning",
    "GPUUnavailableError",
    "GlobalNormClipper",
    "NonFiniteNormError",
    "PerSampleClipResult",
    "ZClip",
    "__version__",
    "adaptive",
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
    "constraints",
    "global_norm",
    "info",
    "norm",
    "normalize",
    "normalize_",
    "optim",
    "scale_",
]
