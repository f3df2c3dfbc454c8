"""Fused clip-and-step optimizers on the GPU: CUDA tensors and CuPy arrays.

This file owns the fused optimizers on a real GPU; their CPU values are in
tests/api/test_optim.py.

Parity with ``torch.optim.AdamW`` / ``SGD`` after ``clip_grad_norm_`` over
100 steps, with the CPU kernels (same formulas: float32 to ~1 ulp, 16-bit to
one rounding), every hyper-parameter variant, many tensors and a multi-chunk
tensor, the non-finite policies, no host sync, a non-default stream.
Everything here skips with its reason where no CUDA device is usable.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _backends import no_host_sync, require_gpu_module

import fastclip
from fastclip.optim import adamw_step_, sgd_step_

torch = require_gpu_module()
import cupy  # noqa: E402
import cupyx  # noqa: E402

from fastclip.torch import FusedAdamW, FusedSGD  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(
        device="cuda", dtype=dtype
    )


def _train(ref_opt, opt, ref, ours, steps, max_norm, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 16, device="cuda", dtype=dtype, generator=gen)
        for mdl in (ref, ours):
            mdl.zero_grad()
            mdl(x).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        ref_opt.step()
        opt.step()


def _tol(dtype):
    # torch's CUDA AdamW/SGD (foreach) fuse and round differently from torch's CPU
    # code, which fastclip follows: ulp-level differences per step, over 100 steps.
    return dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_adamw_matches_torch_over_100_steps(dtype, amsgrad, maximize, weight_decay):
    ref, ours = _model(0, dtype), _model(0, dtype)
    kw = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=weight_decay, amsgrad=amsgrad)
    ref_opt = torch.optim.AdamW(ref.parameters(), maximize=maximize, **kw)
    opt = FusedAdamW(ours.parameters(), maximize=maximize, max_norm=0.5, **kw)
    _train(ref_opt, opt, ref, ours, 100, 0.5, dtype)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, **_tol(dtype))
    assert opt.last_total_norm.device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kw",
    [
        dict(momentum=0.0),
        dict(momentum=0.0, weight_decay=0.01),
        dict(momentum=0.9),
        dict(momentum=0.9, dampening=0.2, weight_decay=0.01),
        dict(momentum=0.9, nesterov=True, weight_decay=0.01),
        dict(momentum=0.9, maximize=True),
    ],
)
def test_fused_sgd_matches_torch_over_100_steps(dtype, kw):
    ref, ours = _model(1, dtype), _model(1, dtype)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-2, **kw)
    opt = FusedSGD(ours.parameters(), lr=1e-2, max_norm=0.5, **kw)
    _train(ref_opt, opt, ref, ours, 100, 0.5, dtype)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, **_tol(dtype))


# ------------------------------------------------ GPU kernels vs CPU kernels


def _lists(n, dtype, seed, big=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    sizes = [1 + (37 * i) % 300 for i in range(n)]
    if big:
        sizes.append(2**20 + 12_345)  # many chunks, an unaligned tail
    p = [torch.randn(s, device="cuda", generator=g).to(dtype) for s in sizes]
    gr = [torch.randn(s, device="cuda", generator=g).to(dtype) for s in sizes]
    m = [torch.randn(s, device="cuda", generator=g).mul(0.1).to(dtype) for s in sizes]
    v = [torch.rand(s, device="cuda", generator=g).mul(0.01).to(dtype) for s in sizes]
    return p, gr, m, v


def _close(gpu, cpu, dtype):
    if dtype in (torch.float16, torch.bfloat16):
        # the same float32 formulas, one rounding on store: equal but for rare ties
        a, b = gpu.cpu().double(), cpu.double()
        assert (a == b).double().mean() > 0.999
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    else:
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_step_matches_the_cpu_kernels(dtype, amsgrad, maximize):
    p, g, m, v = _lists(500, dtype, 0, big=True)
    x = [t.clone() for t in v] if amsgrad else None
    cpu = [[t.cpu() for t in lst] for lst in (p, g, m, v, x or [])]
    total = fastclip.global_norm(g)  # one norm for both: the coefficients are identical
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, maximize=maximize)
    steps = [3 + i % 5 for i in range(len(p))]  # per-tensor step counts
    out = adamw_step_(
        p, g, m, v, step=steps, max_exp_avg_sqs=x, max_norm=1.0, total_norm=total, **kw
    )
    adamw_step_(
        cpu[0], cpu[1], cpu[2], cpu[3], step=steps, max_exp_avg_sqs=cpu[4] if amsgrad else None,
        max_norm=1.0, total_norm=float(total), **kw,
    )  # fmt: skip
    assert out.device.type == "cuda"
    for gpu_list, cpu_list in zip((p, m, v, x or []), (cpu[0], cpu[2], cpu[3], cpu[4])):
        for a, b in zip(gpu_list, cpu_list):
            _close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_step_matches_the_cpu_kernels(dtype, nesterov):
    p, g, b, _ = _lists(500, dtype, 1, big=True)
    cpu = [[t.cpu() for t in lst] for lst in (p, g, b)]
    first = [i % 3 == 0 for i in range(len(p))]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov, first_step=first)
    sgd_step_(p, g, b, max_norm=2.0, total_norm=5.0, **kw)
    sgd_step_(cpu[0], cpu[1], cpu[2], max_norm=2.0, total_norm=5.0, **kw)
    for a, c in zip(p + b, cpu[0] + cpu[2]):
        _close(a, c, dtype)


def test_cupy_arrays_match_numpy():
    rng = np.random.default_rng(0)
    sizes = [5, 1000, 2**20 + 3]
    P = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    G = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    M = [np.zeros(s, np.float32) for s in sizes]
    V = [np.zeros(s, np.float32) for s in sizes]
    p, g, m, v = ([cupy.asarray(a) for a in lst] for lst in (P, G, M, V))
    total = float(np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in G)))
    norm = adamw_step_(p, g, m, v, step=1, max_norm=1.0, total_norm=total)
    adamw_step_(P, G, M, V, step=1, max_norm=1.0, total_norm=total)
    assert isinstance(norm, cupy.ndarray)
    for a, b in zip(p + m + v, P + M + V):
        np.testing.assert_allclose(cupy.asnumpy(a), b, rtol=1e-6, atol=1e-7)
    B = [np.empty(s, np.float32) for s in sizes]
    b = [cupy.asarray(a) for a in B]
    sgd_step_(p, g, b, lr=0.1, momentum=0.9, first_step=True, max_norm=1.0, total_norm=total)
    sgd_step_(P, G, B, lr=0.1, momentum=0.9, first_step=True, max_norm=1.0, total_norm=total)
    for a, c in zip(p + b, P + B):
        np.testing.assert_allclose(cupy.asnumpy(a), c, rtol=1e-6, atol=1e-7)


def test_computed_norm_matches_torch():
    p, g, m, v = _lists(50, torch.float32, 2)
    norm = adamw_step_(p, g, m, v, step=1, max_norm=1.0)
    expected = torch.linalg.vector_norm(torch.cat([t.double() for t in g]))
    assert math.isclose(norm.item(), expected.item(), rel_tol=1e-6)


# ---------------------------------------------------- policies, syncs, streams


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_skip_leaves_everything_untouched_without_a_sync(bad):
    p, g, m, v = _lists(20, torch.float32, 3)
    with torch.no_grad():
        g[4][1] = bad
    before = [t.clone() for t in p + m + v]
    with no_host_sync():  # the kernels read the device norm and return before writing
        norm = adamw_step_(p, g, m, v, step=1, max_norm=1.0, nonfinite="skip")
        sgd_step_(p, g, lr=0.1, max_norm=1.0, nonfinite="skip")
    assert not math.isfinite(norm.item())
    for a, b in zip(p + m + v, before):
        assert torch.equal(a, b)


def test_error_raises_before_any_write():
    p, g, m, v = _lists(20, torch.float32, 4)
    with torch.no_grad():
        g[0][0] = math.nan
    before = [t.clone() for t in p + m + v]
    with pytest.raises(fastclip.NonFiniteNormError):
        adamw_step_(p, g, m, v, step=1, max_norm=1.0, nonfinite="error")
    for a, b in zip(p + m + v, before):
        assert torch.equal(a, b)


def test_propagate_turns_parameters_nan():
    p, g, m, v = _lists(3, torch.float32, 5)
    with torch.no_grad():
        g[0][0] = math.nan
    adamw_step_(p, g, m, v, step=1, max_norm=1.0)
    assert torch.isnan(p[2]).all()


def test_fused_optimizers_skip_on_nonfinite_norm():
    model = _model(6)
    opt = FusedAdamW(model.parameters(), max_norm=1.0, nonfinite="skip")
    before = [t.detach().clone() for t in model.parameters()]
    model(torch.full((2, 16), math.nan, device="cuda")).sum().backward()
    opt.step()
    assert opt.last_step_skipped
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a.detach(), b)


def test_no_host_sync_torch():
    p, g, m, v = _lists(100, torch.float32, 7)
    with no_host_sync():
        _steps_without_sync(p, g, m, v)


def _steps_without_sync(p, g, m, v):
    for step in (1, 2):  # the second call reuses the cached device tables
        adamw_step_(p, g, m, v, step=step, max_norm=1.0)
        adamw_step_(p, g, m, v, step=[step] * 50 + [step + 1] * 50, max_norm=1.0)
        sgd_step_(p, g, m, lr=0.1, momentum=0.9, first_step=step == 1, max_norm=1.0)
        adamw_step_(p, g, m, v, step=step, max_norm=1.0, total_norm=torch.ones((), device="cuda"))
        sgd_step_(p, g, lr=0.1, clip_coef=torch.full((), 0.5, device="cuda"))


def test_fused_optimizers_have_no_host_sync():
    model = _model(8)
    opts = [FusedAdamW(model.parameters(), max_norm=1.0), FusedSGD(model.parameters(), lr=0.1, momentum=0.9, max_norm=1.0)]  # fmt: skip
    for opt in opts:
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(4, 16, device="cuda")).sum().backward()
            with no_host_sync():
                opt.step()


def test_no_host_sync_cupy():
    xs = [cupy.random.standard_normal(1000 + i, dtype=cupy.float32) for i in range(10)]
    gs = [cupy.random.standard_normal(1000 + i, dtype=cupy.float32) for i in range(10)]
    ms = [cupy.zeros_like(x) for x in xs]
    vs = [cupy.zeros_like(x) for x in xs]
    cupy.cuda.Device().synchronize()
    with cupyx.allow_synchronize(False):
        adamw_step_(xs, gs, ms, vs, step=1, max_norm=1.0)
        sgd_step_(xs, gs, ms, lr=0.1, momentum=0.9, first_step=True, max_norm=1.0)


def test_non_default_stream_is_used_and_ordered():
    p, g, m, v = _lists(30, torch.float32, 9)
    p2, g2, m2, v2 = ([t.clone() for t in lst] for lst in (p, g, m, v))
    adamw_step_(p, g, m, v, step=1, max_norm=1.0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for t in g2:
            t.mul_(1.0)  # work queued on s before the step: the step must see it
        adamw_step_(p2, g2, m2, v2, step=1, max_norm=1.0)
        done = [t.clone() for t in p2]  # queued on s after the step
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(p, done):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_input_raises_before_any_write():
    p, g, m, v = _lists(3, torch.float32, 10)
    before = [t.clone() for t in p]
    with pytest.raises(TypeError, match="GPU"):
        adamw_step_(p, [t.cpu() for t in g], m, v, step=1)
    with pytest.raises(TypeError):
        adamw_step_(p, g, [cupy.asarray(t.cpu().numpy()) for t in m], v, step=1)
    with pytest.raises(ValueError, match="shape"):
        adamw_step_(p, g, [*m[:2], m[2][:-1]], v, step=1)
    with pytest.raises(ValueError, match="share memory"):
        adamw_step_(p, g, p, v, step=1)
    for a, b in zip(p, before):
        assert torch.equal(a, b)
