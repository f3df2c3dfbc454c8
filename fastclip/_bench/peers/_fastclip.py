"""fastclip itself: its public API on NumPy arrays, torch CPU tensors (the
``fastclip.torch`` drop-ins where the torch peers use ``torch.nn.utils``) and
CUDA tensors or CuPy arrays; the ``adamw`` workload through the fused step."""

from __future__ import annotations

from typing import Any

from ..data import ADAMW, CaseData
from ._common import Op, gpu_storage, params_and_moments


def _fastclip_ops(
    arrays: list[Any],
    d: CaseData,
    inplace: bool,
    drop_in: Any = None,
    params: list[Any] | None = None,
) -> Op:
    """fastclip's public API on ``arrays`` (NumPy, torch, CuPy); ``drop_in`` is
    ``fastclip.torch``, used where the torch peers use ``torch.nn.utils``."""
    import fastclip as fc

    kind = d.case.kind
    x = arrays[0]
    if kind == "persample":
        c = d.max_norm
        return lambda: fc.clip_per_sample(arrays, c).grads
    if kind == "clip":
        c = d.max_norm
        if inplace and drop_in is not None and params is not None:
            return lambda: (drop_in.clip_grad_norm_(params, c), arrays)[1]
        if len(arrays) == 1:
            if inplace:
                return lambda: (fc.clip_by_norm_(x, c), arrays)[1]
            return lambda: [fc.clip_by_norm(x, c)]
        if inplace:
            return lambda: (fc.clip_by_global_norm_(arrays, c), arrays)[1]
        return lambda: fc.clip_by_global_norm(arrays, c)[0]
    if kind == "rows":
        c = d.max_norm
        if inplace:
            return lambda: (fc.clip_by_norm_(x, c, axis=1), arrays)[1]
        return lambda: [fc.clip_by_norm(x, c, axis=1)]
    if kind == "value":
        v = d.clip_value
        if inplace and drop_in is not None and params is not None:
            return lambda: (drop_in.clip_grad_value_(params, v), arrays)[1]
        if inplace:
            return lambda: (fc.clip_by_value_(x, -v, v), arrays)[1]
        return lambda: [fc.clip_by_value(x, -v, v)]
    if drop_in is not None:
        return lambda: drop_in.get_total_norm(arrays)
    if len(arrays) == 1:
        return lambda: fc.norm(x)
    return lambda: fc.global_norm(arrays)


def make_fastclip(d: CaseData, inplace: bool) -> Op:
    if d.case.kind == "adamw":
        return _fastclip_adamw(d, d.numpy_arrays(), d.param_copies("numpy"))
    return _fastclip_ops(d.numpy_arrays(), d, inplace)


def make_fastclip_torch(d: CaseData, inplace: bool) -> Op:
    import fastclip.torch as fct

    if d.case.kind == "adamw":
        params = d.param_copies("torch")
        opt = fct.FusedAdamW(params, **ADAMW, max_norm=d.max_norm)
        return lambda: (opt.step(), params_and_moments(params, opt))[1]
    if d.case.kind == "persample":
        return _fastclip_ops(d.torch_tensors("cpu"), d, inplace)
    params = d.torch_params("cpu")
    return _fastclip_ops([p.grad for p in params], d, inplace, fct, params)


def _fastclip_adamw(d: CaseData, grads: list[Any], params: list[Any]) -> Op:
    """fastclip's fused clip + AdamW step through the functional API (NumPy or CuPy)."""
    from fastclip.optim import adamw_step_

    m = [p * 0 for p in params]
    v = [p * 0 for p in params]
    step = [0]

    def op() -> list[Any]:
        step[0] += 1
        adamw_step_(params, grads, m, v, step=step[0], **ADAMW, max_norm=d.max_norm)
        return params + m

    return op


def make_fastclip_gpu(d: CaseData, inplace: bool) -> Op:
    if d.case.kind == "adamw":
        if gpu_storage() == "torch-cuda":
            import fastclip.torch as fct

            params = d.param_copies("torch", "cuda")
            opt = fct.FusedAdamW(params, **ADAMW, max_norm=d.max_norm)
            return lambda: (opt.step(), params_and_moments(params, opt))[1]
        return _fastclip_adamw(d, d.cupy_arrays(), d.param_copies("cupy"))
    if gpu_storage() == "torch-cuda":
        arrays = d.torch_tensors("cuda")
    else:
        arrays = d.cupy_arrays()
    return _fastclip_ops(arrays, d, inplace)
