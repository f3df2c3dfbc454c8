"""GPU-only behaviour: no host sync, stream ordering, CUDA graphs, multi-block and
64-bit index paths.  The whole CPU matrix also runs on the ``cupy`` and
``torch_cuda`` backends of ``tests/_backends.py``.  Everything here skips with
its reason where no CUDA device is usable.

This file owns what only a real GPU shows; the GPU members of the backend matrix run
every tests/api/ file where a device is usable.
"""

from __future__ import annotations

import numpy as np
import pytest
from _backends import no_host_sync, require_gpu_module

import fastclip
import fastclip.torch as fct
from fastclip import _config as cfg

torch = require_gpu_module()
import cupy  # noqa: E402
import cupyx  # noqa: E402


def _ref_global(arrays, p=2.0):
    flat = np.concatenate([np.abs(a.detach().double().cpu().numpy()).ravel() for a in arrays])
    return flat.max() if p == np.inf else (flat**p).sum() ** (1 / p)


@pytest.fixture
def sync_error():
    with no_host_sync():
        yield


def _grads(n=20, size=1000, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(size + i, device="cuda", dtype=dtype, generator=g) for i in range(n)]


def test_no_host_sync_torch(sync_error):
    grads = _grads()
    expected = _ref_global(grads)
    for _ in range(2):  # second call reuses the cached device table
        norm = fastclip.global_norm(grads)
        fastclip.norm(grads[0])
        fastclip.norm(grads[0].reshape(10, -1), axis=1)
        fastclip.clip_by_norm_(grads[1], 1e9)
        fastclip.clip_by_norm(grads[1], 1e9)
        fastclip.clip_by_value_(grads[2], -10.0, 10.0)
        fastclip.clip_by_value(grads[2], -10.0, 10.0)
        fastclip.clip_by_global_norm(grads, 1e9)
        total = fastclip.clip_by_global_norm_(grads, 1e9)
    torch.cuda.set_sync_debug_mode("default")
    assert norm.device.type == "cuda" and total.device.type == "cuda"
    np.testing.assert_allclose(norm.item(), expected, rtol=1e-6)


def test_clip_grad_norm_drop_in_has_no_sync(sync_error):
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
    ).cuda()
    model(torch.randn(32, 64, device="cuda")).sum().backward()
    fct.clip_grad_norm_(model.parameters(), 0.1)
    fct.clip_grad_norm_(model.parameters(), 0.1)


def test_no_host_sync_cupy():
    xs = [cupy.random.standard_normal(1000 + i, dtype=cupy.float32) for i in range(10)]
    expected = np.sqrt(sum(float((x.astype(cupy.float64) ** 2).sum()) for x in xs))
    cupy.cuda.Device().synchronize()
    with cupyx.allow_synchronize(False):
        norm = fastclip.global_norm(xs)
        total = fastclip.clip_by_global_norm_(xs, 1.0)
        fastclip.clip_by_norm_(xs[0], 1.0)
    assert isinstance(norm, cupy.ndarray) and norm.shape == ()
    np.testing.assert_allclose(float(norm), expected, rtol=1e-6)
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    assert expected > 10  # so the clip really scaled: the new global norm is max_norm
    np.testing.assert_allclose(float(fastclip.global_norm(xs)), 1.0, rtol=1e-5)


def test_error_if_nonfinite_syncs_once_and_modifies_nothing():
    grads = _grads(3)
    grads[1][5] = float("nan")
    before = [g.clone() for g in grads]
    with pytest.raises(fastclip.NonFiniteNormError):
        fastclip.clip_by_global_norm_(grads, 1.0, error_if_nonfinite=True)
    for g, b in zip(grads, before, strict=True):
        assert torch.equal(g.nan_to_num(), b.nan_to_num())


def test_non_default_stream_orders_with_torch():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        big = torch.full((1 << 24,), 2.0, device="cuda")  # produced on s
        norm = fastclip.clip_by_norm_(big, 1.0, eps=0.0)  # must run after the fill, on s
        out = big.sum()
    s.synchronize()
    np.testing.assert_allclose(norm.item(), 2.0 * 2**12, rtol=1e-6)
    np.testing.assert_allclose(out.item(), 2**24 / 2**12, rtol=1e-4)


def test_cuda_graph_capture_of_clip_grad_norm_replays():
    model = torch.nn.Linear(256, 256).cuda()
    x = torch.randn(64, 256, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up: compiles kernels, caches the table
            model.zero_grad(set_to_none=False)
            model(x).sum().backward()
            fct.clip_grad_norm_(model.parameters(), 0.5)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        model(x).sum().backward()
        total = fct.clip_grad_norm_(model.parameters(), 0.5)
    for scale in (1.0, 3.0):
        with torch.no_grad():
            x.mul_(scale)
        model.zero_grad(set_to_none=False)
        graph.replay()
        torch.cuda.synchronize()
        ref_model = torch.nn.Linear(256, 256).cuda()
        ref_model.load_state_dict(model.state_dict())
        ref_model(x).sum().backward()
        ref = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
        np.testing.assert_allclose(total.item(), ref.item(), rtol=1e-5)
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1.0, 2.0, float("inf"), 3.0])
def test_multi_block_paths_match_reference(monkeypatch, dtype, p):
    monkeypatch.setattr(cfg, "GPU_CHUNK", 37)
    monkeypatch.setattr(cfg, "GPU_BLOCK", 64)
    monkeypatch.setattr(cfg, "GPU_FINISH_BLOCK", 64)
    monkeypatch.setattr(cfg, "GPU_MAX_BLOCKS", 3)
    grads = _grads(7, 501, dtype)
    ref = _ref_global(grads, p)
    np.testing.assert_allclose(fastclip.global_norm(grads, p).item(), ref, rtol=1e-5)
    work = [g.clone() for g in grads]
    total = fastclip.clip_by_global_norm_(work, 1.0, p)
    np.testing.assert_allclose(total.item(), ref, rtol=1e-5)
    coef = min(1.0, 1.0 / (ref + 1e-6))
    for w, g in zip(work, grads, strict=True):
        torch.testing.assert_close(w, (g.double() * coef).to(dtype), rtol=1e-2, atol=1e-3)


def test_many_tensors_parity_with_torch():
    grads = _grads(10_000, 64)
    mine = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.empty(0, device="cuda")) for _ in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    ref = torch.nn.utils.clip_grad_norm_(params, 1.0)
    total = fastclip.clip_by_global_norm_(mine, 1.0)
    np.testing.assert_allclose(total.item(), ref.item(), rtol=1e-5)
    for a, b in zip(mine, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_index_past_two_to_the_31():
    n = 2**31 + 1000
    try:
        x = torch.full((n,), 0.5, dtype=torch.float16, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2**31-element float16 array")
    x[-1] = 4.0
    np.testing.assert_allclose(fastclip.norm(x, float("inf")).item(), 4.0)
    expected = np.sqrt((n - 1) * 0.25 + 16.0)
    np.testing.assert_allclose(fastclip.norm(x).item(), expected, rtol=1e-6)
    fastclip.scale_([x], 2.0)
    assert x[-1].item() == 8.0 and x[2**31 + 10].item() == 1.0


def test_mixed_cpu_and_gpu_raise_type_error():
    with pytest.raises(TypeError):
        fastclip.global_norm([torch.ones(3, device="cuda"), torch.ones(3)])
    with pytest.raises(TypeError):
        fastclip.global_norm([torch.ones(3, device="cuda"), np.ones(3, np.float32)])


def _two_factor_cases():
    from _gpu_emulation import COEF_CASES

    return [
        pytest.param(data, c, ord, id=f"{name}-ord{ord}")
        for name, data, c, ords in COEF_CASES
        for ord in ords
    ]


@pytest.mark.parametrize(("data", "c", "ord"), _two_factor_cases())
@pytest.mark.parametrize("lib", ["torch", "cupy"])
def test_coefficients_beyond_float64_range_match_the_cpu_route(data, c, ord, lib):
    """float64 [1e300, ...] clipped to 1e-300 with eps 0 is not 0; subnormal data
    normalised are not NaN/inf: the device's two factors (c, c2), bit for bit the
    CPU route's result (ord 1 and inf: the same norm), in and out of place, per row
    beside an ordinary row, and for a global list."""
    import reference as ref
    from _gpu_emulation import cpu_rescale, exact_scaled

    def dev(a):
        a = np.ascontiguousarray(a)
        return torch.tensor(a, device="cuda") if lib == "torch" else cupy.asarray(a)

    def host(a):
        return a.cpu().numpy() if lib == "torch" else cupy.asnumpy(a)

    def call(a, axis=None, inplace=False):
        kw = {"ord": ord, "eps": 0.0, "axis": axis}
        if c is None:
            return (fastclip.normalize_ if inplace else fastclip.normalize)(a, **kw)
        return (fastclip.clip_by_norm_ if inplace else fastclip.clip_by_norm)(a, c, **kw)

    x = np.asarray(data, np.float64)
    n = float(ref.norm(x, ord))
    want = x.copy() if c is not None and c >= n else exact_scaled(x, c or 1.0, n)
    cpu = cpu_rescale(x, c, ord)
    exact = ord in (1, np.inf)

    def check(got, cpu_got, want_row=None):
        if exact:
            np.testing.assert_array_equal(got, cpu_got)
        np.testing.assert_allclose(
            got if want_row is None else got[0],
            want if want_row is None else want_row,
            rtol=1e-13,
            atol=2e-323,
        )

    check(host(call(dev(x))), cpu)
    d = dev(x)
    call(d, inplace=True)
    check(host(d), cpu)
    rows = np.stack([x, np.asarray([3.0, 4.0, 12.0][: len(x)])])
    check(host(call(dev(rows), axis=1)), cpu_rescale(rows, c, ord, axis=1), want)
    cols = dev(rows.T)
    call(cols, axis=0, inplace=True)
    check(host(cols).T, cpu_rescale(rows.T.copy(), c, ord, axis=0).T, want)
    if c is not None:
        arrays = [x[:2].copy(), np.append(x[2:], 1e99)]
        cpu_outs, _ = fastclip.clip_by_global_norm(arrays, c, ord=ord, eps=0.0)
        t = float(ref.global_norm(arrays, ord))
        devs = [dev(a) for a in arrays]
        fastclip.clip_by_global_norm_(devs, c, ord=ord, eps=0.0)
        for g, w, a in zip(devs, cpu_outs, arrays, strict=True):
            if exact:
                np.testing.assert_array_equal(host(g), np.asarray(w))
            np.testing.assert_allclose(host(g), exact_scaled(a, c, t), rtol=1e-13, atol=2e-323)


def test_two_factor_clip_has_no_host_sync(sync_error):
    data, tiny = [1e300, -2e300, 3e299], [0.0, 1e-310]
    x = torch.tensor(data, dtype=torch.float64, device="cuda")
    y = fastclip.clip_by_norm(x, 1e-300, ord=1, eps=0.0)
    rows = torch.stack([x, torch.tensor([3.0, 4.0, 12.0], dtype=torch.float64, device="cuda")])
    rows_host = rows.cpu().numpy()
    fastclip.clip_by_norm_(rows, 1e-300, ord=1, eps=0.0, axis=1)
    w = fastclip.normalize(torch.tensor(tiny, dtype=torch.float64, device="cuda"), ord=1, eps=0.0)
    torch.cuda.set_sync_debug_mode("default")
    cpu = fastclip.clip_by_norm(np.asarray(data), 1e-300, ord=1, eps=0.0)
    np.testing.assert_array_equal(y.cpu().numpy(), cpu)
    assert np.all(np.asarray(cpu) != 0)
    fastclip.clip_by_norm_(rows_host, 1e-300, ord=1, eps=0.0, axis=1)
    np.testing.assert_array_equal(rows.cpu().numpy(), rows_host)
    np.testing.assert_array_equal(w.cpu().numpy(), [0.0, 1.0])
