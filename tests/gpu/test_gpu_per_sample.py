"""clip_per_sample on the GPU route (CUDA tensors, CuPy arrays): parity with the Opacus
formula computed by torch in float64 on the device, with the CPU route, and the edge
cases (B = 1, wide rows, NaN and zero-norm samples, non-default streams, forced row
groups).  Everything here skips with its reason where no CUDA device is usable.

This file owns clip_per_sample on a real GPU; its CPU values are in
tests/api/test_per_sample.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _backends import require_gpu_module

import fastclip
from fastclip._gpu import _per_sample as gps

torch = require_gpu_module()
import cupy  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-6, torch.float64: 1e-12}


def opacus(grads, max_norm, per_layer=False, reduce="sum", eps=1e-6, ord=2.0):
    """Opacus' clipping in float64 torch on the device: (outputs, norms, n_clipped)."""
    g = [x.detach().to(torch.float64) for x in grads]
    b = g[0].shape[0]
    flat = [x.reshape(b, -1) for x in g]
    per = torch.stack([torch.linalg.vector_norm(x, ord, dim=1) for x in flat])  # [K, B]
    if per_layer:
        norms = per
        c = torch.tensor(np.broadcast_to(max_norm, (len(g),)).tolist(), dtype=torch.float64)
        f = (c.to(per.device)[:, None] / (norms + eps)).clamp(max=1.0)
        f = torch.where(norms + eps == 0, torch.ones_like(f), f)
        clipped = int((f < 1).any(dim=0).sum())
    else:
        norms = torch.linalg.vector_norm(per, ord, dim=0)
        f1 = (max_norm / (norms + eps)).clamp(max=1.0)
        f1 = torch.where(norms + eps == 0, torch.ones_like(f1), f1)
        clipped = int((f1 < 1).sum())
        f = f1.expand(len(g), b)
    outs = []
    for k, x in enumerate(g):
        y = torch.einsum("i,i...->i...", f[k], x)
        if reduce == "sum":
            y = y.sum(0)
        elif reduce == "mean":
            y = y.mean(0)
        outs.append(y)
    return outs, norms, clipped


def _grads(shapes, dtype=torch.float32, batch=33, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn((batch, *s), device="cuda", dtype=dtype, generator=gen) * (0.05 + k)
        for k, s in enumerate(shapes)
    ]


def _assert_matches(res, grads, ref, reduce):
    outs, ref_norms, ref_clipped = ref
    got = res.grads if isinstance(res.grads, list) else [res.grads]
    assert res.n_clipped == ref_clipped and type(res.n_clipped) is int
    wide = any(x.dtype == torch.float64 for x in grads)
    assert res.norms.device == grads[0].device
    assert res.norms.dtype == (torch.float64 if wide else torch.float32)
    rtol = 1e-12 if wide else 1e-6
    torch.testing.assert_close(res.norms.double(), ref_norms, rtol=rtol, atol=0)
    for x, o, r in zip(grads, got, outs, strict=True):
        assert o.device == x.device and o.dtype == x.dtype
        assert tuple(o.shape) == (tuple(x.shape) if reduce is None else tuple(x.shape[1:]))
        t = TOL[x.dtype]
        scale = float(x.double().abs().sum(0).max()) if x.numel() else 0.0
        torch.testing.assert_close(o.double(), r, rtol=t, atol=t * scale + 1e-30)


@pytest.mark.parametrize("reduce", ["sum", "mean", None])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opacus_parity(dtype, per_layer, reduce):
    grads = _grads([(64, 3), (17,), (5, 4, 3), (1,)], dtype)
    bound = [0.5, 2.0, 1.0, 0.1] if per_layer else 1.0
    res = fastclip.clip_per_sample(grads, bound, per_layer=per_layer, reduce=reduce)
    _assert_matches(res, grads, opacus(grads, bound, per_layer, reduce), reduce)


@pytest.mark.parametrize("ord", [1.0, 3.0, math.inf])
def test_other_orders(ord):
    grads = _grads([(40,), (7, 2)], torch.float64, batch=20)
    res = fastclip.clip_per_sample(grads, 1.0, ord=ord)
    _assert_matches(res, grads, opacus(grads, 1.0, ord=ord), "sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_layer", [False, True])
def test_equals_cpu_route(dtype, per_layer):
    grads = _grads([(300,), (8, 9), (2,)], dtype, batch=130)
    gpu = fastclip.clip_per_sample(grads, 1.0, per_layer=per_layer)
    cpu = fastclip.clip_per_sample([g.cpu() for g in grads], 1.0, per_layer=per_layer)
    assert gpu.n_clipped == cpu.n_clipped
    torch.testing.assert_close(gpu.norms.cpu(), cpu.norms, rtol=1e-6, atol=0)
    for a, b in zip(gpu.grads, cpu.grads, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


def test_cupy_arrays():
    rng = np.random.default_rng(1)
    host = [rng.standard_normal((12, 50)).astype(np.float32), rng.standard_normal((12, 3, 3))]
    xs = [cupy.asarray(h) for h in host]
    res = fastclip.clip_per_sample(xs, 1.0, reduce="mean")
    assert isinstance(res.norms, cupy.ndarray) and res.norms.dtype == np.float64
    assert all(isinstance(o, cupy.ndarray) for o in res.grads)
    assert [o.dtype for o in res.grads] == [np.float32, np.float64]
    cpu = fastclip.clip_per_sample(host, 1.0, reduce="mean")
    assert res.n_clipped == cpu.n_clipped
    np.testing.assert_allclose(cupy.asnumpy(res.norms), cpu.norms, rtol=1e-12)
    for a, b in zip(res.grads, cpu.grads, strict=True):
        np.testing.assert_allclose(cupy.asnumpy(a), b, rtol=1e-6, atol=1e-6)
    single = fastclip.clip_per_sample(xs[0], 1.0, reduce=None)
    assert isinstance(single.grads, cupy.ndarray) and single.grads.shape == (12, 50)


@pytest.mark.parametrize("reduce", ["sum", None])
def test_batch_of_one(reduce):
    grads = _grads([(100,), (3,)], batch=1)
    for per_layer in (False, True):
        res = fastclip.clip_per_sample(grads, 0.5, per_layer=per_layer, reduce=reduce)
        _assert_matches(res, grads, opacus(grads, 0.5, per_layer, reduce), reduce)


@pytest.mark.parametrize("cols", [2**20 + 3, 2**21])  # unaligned rows (scalar) and vector loads
def test_wide_rows(cols):
    grads = _grads([(cols,)], torch.float32, batch=6)
    res = fastclip.clip_per_sample(grads, 1.0)
    _assert_matches(res, grads, opacus(grads, 1.0), "sum")
    res = fastclip.clip_per_sample(grads, 1.0, reduce=None)
    _assert_matches(res, grads, opacus(grads, 1.0, reduce=None), None)


def test_nan_and_zero_norm_samples():
    (g,) = _grads([(40,)], batch=5)
    g[1] = 0.0
    g[3, 7] = float("nan")
    res = fastclip.clip_per_sample(g, 0.1, reduce=None)
    assert res.norms[1].item() == 0.0 and math.isnan(res.norms[3].item())
    assert torch.equal(res.grads[1], torch.zeros_like(g[1]))  # factor 1, not 0/0
    assert torch.isnan(res.grads[3]).all()
    assert res.n_clipped == 3  # the NaN sample is not counted, as on the CPU route
    summed = fastclip.clip_per_sample(g, 0.1)
    assert torch.isnan(summed.grads).all()


def test_non_default_stream_orders_with_torch():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        g = torch.full((64, 1 << 16), 0.5, device="cuda")  # produced on s
        res = fastclip.clip_per_sample(g, 1.0, eps=0.0)  # must run after the fill, on s
        total = res.grads.sum()
    s.synchronize()
    norm = 0.5 * 2**8
    np.testing.assert_allclose(res.norms.cpu().numpy(), norm, rtol=1e-6)
    np.testing.assert_allclose(total.item(), 64 * (1 << 16) * 0.5 / norm, rtol=1e-5)


def test_cupy_non_default_stream():
    with cupy.cuda.Stream(non_blocking=True) as s:
        x = cupy.full((16, 1000), 2.0, dtype=cupy.float32)
        res = fastclip.clip_per_sample(x, 1.0, eps=0.0, reduce="mean")
        s.synchronize()
    np.testing.assert_allclose(cupy.asnumpy(res.grads), 2.0 / (2.0 * math.sqrt(1000)), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forced_row_groups_and_chunks(monkeypatch, dtype):
    monkeypatch.setattr(gps, "POW_CHUNK", 40)
    monkeypatch.setattr(gps, "TARGET_BLOCKS", 4096)
    monkeypatch.setattr(gps, "MIN_SPLIT_ROWS", 3)
    grads = _grads([(1001,), (64,), (7,)], dtype, batch=200)
    res = fastclip.clip_per_sample(grads, [1.0, 0.3, 2.0], per_layer=True)
    _assert_matches(res, grads, opacus(grads, [1.0, 0.3, 2.0], True), "sum")


def test_non_contiguous_and_requires_grad():
    base = _grads([(30, 8)], batch=10)[0].requires_grad_()
    g = base[:, ::2, 1:]
    assert not g.is_contiguous()
    res = fastclip.clip_per_sample(g, 1.0)
    _assert_matches(res, [g], opacus([g], 1.0), "sum")


def test_mixed_cpu_and_gpu_raise_type_error():
    with pytest.raises(TypeError):
        fastclip.clip_per_sample([torch.ones(3, 2, device="cuda"), torch.ones(3, 2)], 1.0)
    with pytest.raises(TypeError):
        fastclip.clip_per_sample([torch.ones(3, 2), torch.ones(3, 2, device="cuda")], 1.0)
    with pytest.raises(TypeError):
        fastclip.clip_per_sample([cupy.ones((3, 2)), np.ones((3, 2))], 1.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_devices_raise_type_error():
    with pytest.raises(TypeError, match="one device"):
        fastclip.clip_per_sample(
            [torch.ones(3, 2, device="cuda:0"), torch.ones(3, 2, device="cuda:1")], 1.0
        )
    with cupy.cuda.Device(1):
        other = cupy.ones((3, 2))
    with pytest.raises(TypeError, match="one device"):
        fastclip.clip_per_sample([cupy.ones((3, 2)), other], 1.0)
