"""SPAMAdamW's and StableSPAMAdamW's fused CUDA routes (``spam_kernels.cu``) on a
real GPU: against the float64 transcriptions of the reference optimizers, against
the fused CPU route (the same operations: float32 to ~1 ulp), against the
``_foreach`` route on the same device, the route taken, and the non-finite policies.

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


STABLE_KW = dict(
    lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, amsgrad=False,
    gamma1=0.7, gamma2=0.9, gamma3=0.999, total_t=20, eta_min=0.5, update_proj_gap=7,
)  # fmt: skip


def _stable_run(device, dtype, seq, fused=True, **extra):
    rng = np.random.default_rng(99)
    init = [rng.normal(size=s) for s in SHAPES]
    params = [torch.nn.Parameter(torch.tensor(x, dtype=dtype, device=device)) for x in init]
    opt = StableSPAMAdamW(params, **dict(STABLE_KW, **extra), fused=fused)
    for gs in seq:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=dtype, device=device)
        opt.step()
    return opt, params, init


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("extra", [{}, dict(amsgrad=True)], ids=["default", "amsgrad"])
def test_stable_spam_cuda_route_matches_the_reference(dtype, extra):
    seq = _grads(30)
    opt, params, init = _stable_run("cuda", dtype, seq, **extra)
    assert opt.last_step_route == "cuda"
    kw = dict(STABLE_KW, **extra)
    oracle = oracles.StableSpamOracle(
        SHAPES, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"], kw["amsgrad"],
        kw["gamma1"], kw["gamma2"], kw["gamma3"], kw["total_t"], kw["eta_min"],
        kw["update_proj_gap"],
    )  # fmt: skip
    ref = [x.copy() for x in init]
    for gs in seq:
        oracle.step(ref, [torch.tensor(g, dtype=dtype).double().numpy() for g in gs])
    rtol = 1e-11 if dtype == torch.float64 else 5e-5
    for p, r in zip(params, ref):
        scale = float(np.abs(r).max())
        np.testing.assert_allclose(
            p.detach().cpu().double().numpy(), r, rtol=rtol, atol=rtol * scale * 1e-2
        )
    for i, p in enumerate(params):
        assert opt.state[p]["step"] == oracle.k[i]
        assert float(opt.state[p]["m_max_t"]) == pytest.approx(oracle.m_max[i], rel=rtol * 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_stable_spam_cuda_and_cpu_fused_routes_agree(dtype):
    seq = _grads(30)
    gpu, pg, _ = _stable_run("cuda", dtype, seq, amsgrad=True)
    cpu, pc, _ = _stable_run("cpu", dtype, seq, amsgrad=True)
    assert (gpu.last_step_route, cpu.last_step_route) == ("cuda", "cpu")
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    for a, b in zip(pg, pc):
        np.testing.assert_allclose(
            a.detach().cpu().double().numpy(), b.detach().double().numpy(), rtol=rtol,
            atol=rtol * 1e-2,
        )  # fmt: skip
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "m_max_t", "m_norm_t", "v_norm_t"):
            x, y = gpu.state[a][key], cpu.state[b][key]
            assert x.dtype == y.dtype and x.device.type == "cuda"
            np.testing.assert_allclose(
                x.cpu().double().numpy(), y.double().numpy(), rtol=rtol, atol=rtol * 1e-4
            )


def test_stable_spam_cuda_fused_and_foreach_routes_agree():
    seq = _grads(30)
    fused, pf, _ = _stable_run("cuda", torch.float32, seq)
    each, pe, _ = _stable_run("cuda", torch.float32, seq, fused=False)
    assert (fused.last_step_route, each.last_step_route) == ("cuda", "foreach")
    for a, b in zip(pf, pe):
        np.testing.assert_allclose(
            a.detach().cpu().double().numpy(), b.detach().cpu().double().numpy(), rtol=1e-5,
            atol=1e-7,
        )  # fmt: skip


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_stable_spam_cuda_policy_changes_nothing(policy):
    import fastclip

    p = torch.nn.Parameter(torch.ones(300, device="cuda"))
    opt = StableSPAMAdamW([p], lr=0.1, nonfinite=policy)
    p.grad = torch.ones(300, device="cuda")
    opt.step()
    before = (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["m_max_t"].clone())
    p.grad[7] = float("nan")
    if policy == "skip":
        opt.step()
        assert opt.last_step_skipped and opt.last_step_route == "cuda"
    else:
        with pytest.raises(fastclip.NonFiniteNormError, match="StableSPAMAdamW"):
            opt.step()
    after = (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["m_max_t"])
    assert all(torch.equal(x, y) for x, y in zip(before, after)) and opt.total_steps == 1
