"""Per-tensor hyper-parameter rows of the fused SPAM and Stable-SPAM steps.

One float64 row per tensor, computed on the host with Python floats exactly as
the multi-tensor (``_foreach``) route of ``fastclip.torch.SPAMAdamW`` /
``StableSPAMAdamW`` computes its scalars, read by the Numba kernels
(``_cpu/_spam_kernels.py``) and the CUDA kernel (``_gpu/spam_kernels.cu``,
whose ``FC_P_*`` defines mirror the ``P_*`` columns).  A leaf: imports nothing
from fastclip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "P_COLS",
    "Q_COLS",
    "spam_rows",
    "stable_spam_rows",
]

# Columns of the SPAM rows.
P_BETA1 = 0
P_W1 = 1  # 1 - beta1
P_BETA2 = 2
P_W2 = 3  # 1 - beta2
P_EPS = 4
P_ALPHA = 5  # -lr * bias correction * warm-up scale (the addcdiv value)
P_DECAY = 6  # -lr * weight_decay (0: no decay)
P_THETA = 7  # the spike threshold
P_CLIP = 8  # 1: spike clipping this step
P_RESET = 9  # 1: m = v = 0 before the update
P_COLS = 10

# Columns of the Stable-SPAM rows.
Q_HAT = 0  # AdaClip's bound: entries with |g| > hat are scaled
Q_SHRINK = 1  # hat / max|g|
Q_FACTOR = 2  # AdaGN's factor c / n (1 when n == 0)
Q_DECAY = 3  # 1 - lr * weight_decay
Q_USE_DECAY = 4  # 1 when weight_decay != 0
Q_B1 = 5  # beta1 * scale
Q_W1 = 6  # 1 - beta1 * scale
Q_BETA2 = 7
Q_W2 = 8  # 1 - beta2
Q_BC2_SQRT = 9  # sqrt(1 - beta2**k)
Q_EPS = 10
Q_NEG_STEP = 11  # -lr / (1 - (beta1 * scale)**k)
Q_RESET = 12  # 1: m = v = 0 after the update
Q_COLS = 13


def spam_rows(
    steps: Sequence[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    scale: float,
    threshold: float,
    clips: bool,
    reset: bool,
) -> np.ndarray:
    """SPAM rows for tensors at per-tensor step counts ``steps`` (already incremented)."""
    rows = np.empty((len(steps), P_COLS), np.float64)
    rows[:, P_BETA1] = beta1
    rows[:, P_W1] = 1.0 - beta1
    rows[:, P_BETA2] = beta2
    rows[:, P_W2] = 1.0 - beta2
    rows[:, P_EPS] = eps
    rows[:, P_DECAY] = -lr * weight_decay if weight_decay > 0 else 0.0
    rows[:, P_THETA] = threshold
    rows[:, P_CLIP] = 1.0 if clips else 0.0
    rows[:, P_RESET] = 1.0 if reset else 0.0
    cache: dict[int, float] = {}
    for i, k in enumerate(steps):
        alpha = cache.get(k)
        if alpha is None:
            size = lr
            if correct_bias:
                size *= math.sqrt(1.0 - beta2**k) / (1.0 - beta1**k)
            alpha = cache[k] = -size * scale
        rows[i, P_ALPHA] = alpha
    return rows


def stable_spam_rows(
    steps: Sequence[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    reset: bool,
    hats: np.ndarray,
    shrinks: np.ndarray,
    factors: np.ndarray,
) -> np.ndarray:
    """Stable-SPAM rows: ``steps`` are the step counts the bias corrections use
    (1 at a reset step), ``hats`` / ``shrinks`` / ``factors`` AdaClip's and
    AdaGN's per-tensor values."""
    b1 = beta1 * scale
    rows = np.empty((len(steps), Q_COLS), np.float64)
    rows[:, Q_HAT] = hats
    rows[:, Q_SHRINK] = shrinks
    rows[:, Q_FACTOR] = factors
    rows[:, Q_DECAY] = 1 - lr * weight_decay
    rows[:, Q_USE_DECAY] = 1.0 if weight_decay != 0 else 0.0
    rows[:, Q_B1] = b1
    rows[:, Q_W1] = 1 - b1
    rows[:, Q_BETA2] = beta2
    rows[:, Q_W2] = 1 - beta2
    rows[:, Q_EPS] = eps
    rows[:, Q_RESET] = 1.0 if reset else 0.0
    for i, k in enumerate(steps):
        rows[i, Q_BC2_SQRT] = math.sqrt(1 - beta2**k)
        rows[i, Q_NEG_STEP] = -lr / (1 - b1**k)
    return rows
