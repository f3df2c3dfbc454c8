"""SPAMAdamW's fused CUDA route (``spam_kernels.cu``) on a real GPU: against the
float64 transcription of the reference SPAM optimizer, against the fused CPU
route (the same operations: float32 to ~1 ulp), the route taken, and
StableSPAMAdamW's documented ``_foreach`` route on CUDA tensors.

Everything here skips with its reason where no CUDA device is usable; the
source is compiled without a GPU in ``test_gpu_spam_compile.py`` and the
driver is checked on emulated memory in ``emulated/test_gpu_spam_emulated.py``.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
from _backends import require_gpu_module

torch = require_gpu_module()

from fastclip.torch import SPAMAdamW, StableSPAMAdamW  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "_spam_oracles_gpu", pathlib.Path(__file__).parents[1] / "integration" / "_spam_oracles.py"
)
oracles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracles)

SHAPES = [(6, 4), (5,), (300, 70), (2, 3, 2)]
KW = dict(
    lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1,
    threshold=50.0, delta_t=10, warmup_steps=4, grad_accu_steps=3,
)  # fmt: skip


def _grads(steps, seed=0):
    rng = np.random.default_rng(seed)
    seq = []
    for t in range(steps):
        gs = [rng.normal(size=s) * 0.1 for s in SHAPES]
        if t in (9, 17):
            gs[0].flat[5] *= 1e3
        seq.append(gs)
    return seq


def _run(device, dtype, seq, fused=True):
    rng = np.random.default_rng(99)
    init = [rng.normal(size=s) for s in SHAPES]
    params = [torch.nn.Parameter(torch.tensor(x, dtype=dtype, device=device)) for x in init]
    opt = SPAMAdamW(params, **KW, fused=fused)
    for gs in seq:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=dtype, device=device)
        opt.step()
    return opt, params, init


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_route_matches_the_reference(dtype):
    seq = _grads(30)
    opt, params, init = _run("cuda", dtype, seq)
    assert opt.last_step_route == "cuda"
    oracle = oracles.SpamOracle(SHAPES, 0.01, (0.9, 0.99), 1e-6, 0.1, 50.0, 10, 4, 3)
    ref = [x.copy() for x in init]
    for gs in seq:
        oracle.step(ref, [torch.tensor(g, dtype=dtype).double().numpy() for g in gs])
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    for p, r in zip(params, ref):
        scale = float(np.abs(r).max())
        np.testing.assert_allclose(
            p.detach().cpu().double().numpy(), r, rtol=rtol, atol=rtol * scale * 1e-2
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cuda_and_cpu_fused_routes_agree(dtype):
    seq = _grads(30)
    gpu, pg, _ = _run("cuda", dtype, seq)
    cpu, pc, _ = _run("cpu", dtype, seq)
    assert (gpu.last_step_route, cpu.last_step_route) == ("cuda", "cpu")
    rtol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    for a, b in zip(pg, pc):
        want = b.detach().double().numpy()
        np.testing.assert_allclose(
            a.detach().cpu().double().numpy(), want, rtol=rtol, atol=rtol * 1e-2
        )
    for a, b in zip(pg, pc):
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = gpu.state[a][key], cpu.state[b][key]
            assert x.dtype == y.dtype and x.device.type == "cuda"
            np.testing.assert_allclose(
                x.cpu().double().numpy(), y.double().numpy(), rtol=rtol, atol=rtol * 1e-4
            )


def test_stable_spam_takes_the_foreach_route_on_cuda():
    p = torch.nn.Parameter(torch.ones(3, device="cuda"))
    p.grad = torch.ones(3, device="cuda")
    opt = StableSPAMAdamW([p], lr=0.1)
    opt.step()
    assert opt.last_step_route == "foreach"
    with pytest.raises(TypeError, match="no fused CUDA kernel"):
        StableSPAMAdamW([p], lr=0.1, fused=True).step()
