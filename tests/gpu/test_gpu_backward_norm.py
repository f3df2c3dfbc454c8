"""BackwardNorm and ``norm_in_backward=True`` on CUDA tensors.

This file owns the norm taken during backward on a real GPU (its CPU rules are
in tests/integration/test_backward_norm.py): the hooks launch fastclip's CUDA
kernels on torch's current stream and keep the norms on the device; the
results match torch's clip and optimizers; a step makes no host sync.
Everything here skips with its reason where no CUDA device is usable.
"""

from __future__ import annotations

import numpy as np
from _backends import no_host_sync, require_gpu_module

torch = require_gpu_module()

import fastclip.torch as fct  # noqa: E402


def _model(seed: int = 0) -> object:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)
    ).cuda()


def _backward(model, seed: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    model(torch.randn(16, 64, device="cuda", generator=gen)).pow(2).sum().backward()


def test_cuda_parameters_are_hooked_and_norms_stay_on_the_device() -> None:
    model = _model()
    bn = fct.BackwardNorm(model)
    assert "hooks=4" in repr(bn)
    _backward(model, 1)
    for m in bn._measures:
        assert m is not None and m.value.is_cuda and m.value.dtype == torch.float64
    total = bn.total_norm()
    assert bn.last_remeasured == 0 and total.is_cuda
    grads = [p.grad.double().cpu().numpy() for p in model.parameters()]
    expected = np.sqrt(sum(float((g**2).sum()) for g in grads))
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)


def test_fused_adamw_norm_in_backward_matches_torch_over_20_steps() -> None:
    ref, ours = _model(), _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = fct.FusedAdamW(ours.parameters(), lr=1e-3, max_norm=0.5, norm_in_backward=True)
    for step in range(20):
        for m in (ref, ours):
            _backward(m, step)
        n = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        opt.step()
        assert opt.backward_norm.last_remeasured == 0
        torch.testing.assert_close(opt.last_total_norm.float(), n, rtol=1e-5, atol=0)
        ref_opt.zero_grad()
        opt.zero_grad()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_step_after_hooks_has_no_host_sync() -> None:
    model = _model()
    opt = fct.FusedAdamW(model.parameters(), lr=1e-3, max_norm=0.5, norm_in_backward=True)
    _backward(model, 0)
    opt.step()  # state, kernels
    opt.zero_grad()
    _backward(model, 1)
    with no_host_sync():
        opt.step()
