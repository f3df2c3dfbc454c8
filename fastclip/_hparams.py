"""Per-tensor hyper-parameter rows of the fused AdamW and SGD steps.

One float64 row per tensor, computed on the host as torch computes them
(Python floats: bias corrections ``1 - beta**step`` per distinct step), read by
the Numba kernels (``_cpu/_optim_kernels.py``) and the CUDA kernels
(``_gpu/optim_kernels.cu``, whose ``FC_A_*``/``FC_S_*`` defines mirror the
columns below).  A leaf: imports nothing from fastclip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Columns of the AdamW hyperparameter matrix.
A_DECAY = 0  # 1 - lr * weight_decay
A_W1 = 1  # 1 - beta1 (the lerp weight)
A_BETA2 = 2
A_W2 = 3  # 1 - beta2
A_EPS = 4
A_NEG_STEP = 5  # -lr / (1 - beta1**step)
A_BC2_SQRT = 6  # sqrt(1 - beta2**step)
A_COLS = 7

# Columns of the SGD hyperparameter matrix.
S_WD = 0
S_MOMENTUM = 1
S_DAMP1 = 2  # 1 - dampening
S_NEG_LR = 3
S_MODE = 4  # 0 no momentum, 1 first step (buffer = grad), 2 momentum
S_NESTEROV = 5
S_COLS = 6


def adamw_hparams(
    steps: list[float], lr: float, beta1: float, beta2: float, eps: float, weight_decay: float
) -> np.ndarray:
    """The kernel's per-tensor hyperparameter rows, computed as torch does (Python floats)."""
    hparams = np.empty((len(steps), A_COLS), np.float64)
    hparams[:, A_DECAY] = 1 - lr * weight_decay
    hparams[:, A_W1] = 1 - beta1
    hparams[:, A_BETA2] = beta2
    hparams[:, A_W2] = 1 - beta2
    hparams[:, A_EPS] = eps
    cache: dict[float, tuple[float, float]] = {}
    for i, s in enumerate(steps):
        pair = cache.get(s)
        if pair is None:
            bias_correction1 = 1 - beta1**s
            bias_correction2 = 1 - beta2**s
            pair = cache[s] = (-(lr / bias_correction1), bias_correction2**0.5)
        hparams[i, A_NEG_STEP], hparams[i, A_BC2_SQRT] = pair
    return hparams


def sgd_hparams(
    n: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first: Sequence[bool] | None,
) -> np.ndarray:
    """The SGD kernel's per-tensor rows; ``first`` marks tensors whose momentum
    buffer starts this step (``None``: every buffer exists)."""
    hparams = np.empty((n, S_COLS), np.float64)
    hparams[:, S_WD] = weight_decay
    hparams[:, S_MOMENTUM] = momentum
    hparams[:, S_DAMP1] = 1 - dampening
    hparams[:, S_NEG_LR] = -lr
    hparams[:, S_NESTEROV] = 1.0 if nesterov else 0.0
    if momentum == 0:
        hparams[:, S_MODE] = 0.0
    elif first is None:
        hparams[:, S_MODE] = 2.0
    else:
        hparams[:, S_MODE] = np.where(np.asarray(first, bool), 1.0, 2.0)
    return hparams
