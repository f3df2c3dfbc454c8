"""clip_per_sample: parity with Opacus and optax formulas, float64 oracle, bad input.

This file owns clip_per_sample on the CPU backends; its GPU route is in tests/gpu/, the
peers run side by side in tests/integration/test_real_peers.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
from _backends import to_f64
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastclip._config as cfg
from fastclip import clip_per_sample

# ----------------------------------------------------------------- helpers


def oracle(arrays, max_norm, ord=2, per_layer=False, reduce="sum", eps=1e-6):
    """The float64 reference (``reference.clip_per_sample``) on any backend's arrays."""
    return ref.clip_per_sample([to_f64(a) for a in arrays], max_norm, ord, per_layer, reduce, eps)


def assert_rel(actual, expected, rtol):
    a, e = to_f64(actual), to_f64(expected)
    assert a.shape == e.shape
    scale = max(np.linalg.norm(e), 1e-300)
    assert np.linalg.norm(a - e) <= rtol * scale, (np.linalg.norm(a - e) / scale, rtol)


def make(rng, shapes, dtype, lib="numpy", scale=1.0):
    arrs = [(rng.standard_normal(s) * scale).astype(np.float64) for s in shapes]
    if lib == "numpy":
        return [a.astype(dtype) for a in arrs]
    return [torch.from_numpy(a).to(dtype) for a in arrs]


# ------------------------------------------------- real per-sample gradients


def per_sample_grads(batch=16, seed=0):
    """vmap(grad) per-sample gradients of a small MLP (torch.func, functional_call)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5)
    ).to(torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(batch, 20, dtype=torch.float64)
    y = torch.randint(0, 5, (batch,))

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return [g[k] for k in params]


def opacus_flat(grads, c, eps=1e-6):
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grads], dim=1).norm(
        2, dim=1
    )
    factor = (c / (norms + eps)).clamp(max=1.0)
    return [torch.einsum("i,i...", factor, g) for g in grads], norms, int((factor < 1).sum())


def opacus_per_layer(grads, cs, eps=1e-6):
    outs, norms = [], []
    for g, c in zip(grads, cs):
        n = g.reshape(len(g), -1).norm(2, dim=-1)
        factor = (c / (n + eps)).clamp(max=1.0)
        outs.append(torch.einsum("i,i...", factor, g))
        norms.append(n)
    return outs, torch.stack(norms)


def optax_per_example_global_norm_clip(grads, c):
    """optax.per_example_global_norm_clip re-implemented in torch (no eps, NaN -> 1)."""
    b = grads[0].shape[0]
    norms = torch.cat([g.reshape(b, -1) for g in grads], dim=-1).norm(dim=-1)
    mult = torch.nan_to_num(torch.clamp(c / norms, max=1.0), nan=1.0)
    clipped = int((mult < 1.0).sum())
    return [torch.einsum("i,i...", mult, g) for g in grads], clipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [0.05, 0.5, 100.0])
def test_opacus_flat_parity(dtype, c):
    grads = [g.to(dtype) for g in per_sample_grads()]
    ref_out, ref_norms, ref_clipped = opacus_flat([g.double() for g in grads], c)
    res = clip_per_sample(grads, c)
    assert isinstance(res.norms, torch.Tensor) and res.norms.shape == (16,)
    for a, e, g in zip(res.grads, ref_out, grads):
        assert isinstance(a, torch.Tensor) and a.dtype == dtype and a.shape == g.shape[1:]
        assert_rel(a, e, 1e-6)
    assert_rel(res.norms, ref_norms, 1e-6)
    assert res.n_clipped == ref_clipped
    if c == 100.0:
        assert res.n_clipped == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opacus_per_layer_parity(dtype):
    grads = [g.to(dtype) for g in per_sample_grads()]
    cs = [0.1, 0.01, 0.2, 0.05]
    ref_out, ref_norms = opacus_per_layer([g.double() for g in grads], cs)
    res = clip_per_sample(grads, cs, per_layer=True)
    for a, e in zip(res.grads, ref_out):
        assert_rel(a, e, 1e-6)
    assert tuple(res.norms.shape) == (4, 16)
    assert_rel(res.norms, ref_norms, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [0.0, 0.1, 1e9])
def test_optax_parity(dtype, c):
    grads = [g.to(dtype) for g in per_sample_grads(batch=9, seed=3)]
    grads = [torch.cat([g[:-1], torch.zeros_like(g[:1])]) for g in grads]  # a zero sample
    ref_out, ref_clipped = optax_per_example_global_norm_clip([g.double() for g in grads], c)
    res = clip_per_sample(grads, c, eps=0.0)
    for a, e in zip(res.grads, ref_out):
        if c == 0.0:
            assert not a.any()
        else:
            assert_rel(a, e, 1e-6)
    assert res.n_clipped == ref_clipped


# ----------------------------------------------------------- float64 oracle

SHAPES = [(7, 3, 5), (7, 11), (7,), (7, 0, 4)]


@pytest.mark.parametrize("reduce", ["sum", "mean", None])
@pytest.mark.parametrize("ord", [1, 2, math.inf, 3.0])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_oracle_numpy(reduce, ord, per_layer, dtype):
    arrs = make(np.random.default_rng(1), SHAPES, dtype)
    before = [a.copy() for a in arrs]
    c = [1.0, 0.5, 0.2, 3.0] if per_layer else 2.0
    res = clip_per_sample(arrs, c, ord, per_layer=per_layer, reduce=reduce)
    outs, norms, clipped = oracle(arrs, c, ord, per_layer, reduce)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    for a, e, x in zip(res.grads, outs, arrs):
        assert isinstance(a, np.ndarray) and a.dtype == dtype
        assert a.shape == (x.shape if reduce is None else x.shape[1:])
        assert_rel(a, e, rtol)
    assert res.norms.dtype == dtype and res.norms.shape == norms.shape
    assert_rel(res.norms, norms, rtol)
    assert res.n_clipped == clipped
    for a, b in zip(arrs, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("reduce", ["sum", "mean", None])
@pytest.mark.parametrize("per_layer", [False, True])
def test_multi_tile_parallel_paths(monkeypatch, reduce, per_layer):
    """Force parallel kernels, many column tiles and a row-block remainder."""
    monkeypatch.setattr(cfg, "PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(cfg, "PER_SAMPLE_COL_TILE", 3)
    monkeypatch.setattr(cfg, "PER_SAMPLE_ROW_BLOCK", 6)
    arrs = make(np.random.default_rng(2), [(13, 17), (13, 2, 5)], np.float32)
    res = clip_per_sample(arrs, 1.5, per_layer=per_layer, reduce=reduce)
    outs, _norms, clipped = oracle(arrs, 1.5, 2, per_layer, reduce)
    for a, e in zip(res.grads, outs):
        assert_rel(a, e, 1e-6)
    assert res.n_clipped == clipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduce", ["sum", None])
def test_oracle_torch(dtype, reduce):
    arrs = make(np.random.default_rng(3), [(9, 40), (9, 4, 4)], dtype, lib="torch")
    res = clip_per_sample(arrs, 3.0, reduce=reduce)
    outs, norms, clipped = oracle(arrs, 3.0, reduce=reduce)
    low = dtype in (torch.bfloat16, torch.float16)
    rtol = 1e-2 if low else (1e-6 if dtype == torch.float32 else 1e-12)
    for a, e in zip(res.grads, outs):
        assert isinstance(a, torch.Tensor) and a.dtype == dtype
        assert_rel(a, e, rtol)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert res.norms.dtype == want
    assert_rel(res.norms, norms, 1e-12 if dtype == torch.float64 else 1e-6)  # stored values
    assert res.n_clipped == clipped


def test_single_array_returns_single_array_and_b1():
    x = np.array([[3.0, 4.0]])
    res = clip_per_sample(x, 1.0, eps=0.0)
    np.testing.assert_allclose(res.grads, [0.6, 0.8])
    np.testing.assert_allclose(res.norms, [5.0])
    assert res.n_clipped == 1
    grads, _norms, n = clip_per_sample(x, 10.0, reduce=None)
    np.testing.assert_array_equal(grads, x)
    assert grads is not x and n == 0


def test_noncontiguous_and_requires_grad():
    base = np.random.default_rng(4).standard_normal((6, 10, 4)).astype(np.float32)
    x = base[:, ::2, :].transpose(0, 2, 1)
    res = clip_per_sample(x, 0.7)
    assert_rel(res.grads, oracle([x], 0.7)[0][0], 1e-6)
    t = torch.from_numpy(base).requires_grad_()
    res = clip_per_sample(t, 0.7)
    assert not res.grads.requires_grad
    assert_rel(res.grads, oracle([base], 0.7)[0][0], 1e-6)


def test_zero_size_features():
    x = np.zeros((5, 0), np.float32)
    y = np.ones((5, 2), np.float32)
    res = clip_per_sample([x, y], 1.0, eps=0.0)
    assert res.grads[0].shape == (0,)
    np.testing.assert_allclose(res.grads[1], 5 / math.sqrt(2))
    res = clip_per_sample(x, 1.0, ord=math.inf, per_layer=True)
    np.testing.assert_array_equal(res.norms, np.zeros((1, 5)))
    assert res.n_clipped == 0


def test_nonfinite_propagates():
    x = np.ones((3, 4), np.float32)
    x[1, 2] = np.nan
    res = clip_per_sample(x, 1.0)
    assert np.isnan(res.norms[1]) and np.isnan(res.grads).all()
    assert res.n_clipped == 2  # NaN factor does not count


def test_generic_path_array_api_strict():
    xp = pytest.importorskip("array_api_strict")
    arrs = make(np.random.default_rng(5), [(6, 3, 2), (6, 5)], np.float32)
    for per_layer in (False, True):
        for reduce in ("sum", "mean", None):
            res = clip_per_sample(
                [xp.asarray(a) for a in arrs], 1.0, per_layer=per_layer, reduce=reduce
            )
            outs, norms, clipped = oracle(arrs, 1.0, 2, per_layer, reduce)
            for a, e in zip(res.grads, outs):
                assert a.dtype == xp.float32
                assert_rel(np.asarray(a), e, 1e-6)
            assert_rel(np.asarray(res.norms), norms, 1e-6)
            assert res.n_clipped == clipped


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
    st.floats(1e-3, 1e2),
    st.sampled_from([1, 2, math.inf]),
)
def test_property_clipped_norms_bounded(x, c, ord):
    res = clip_per_sample(x, c, ord, reduce=None)
    flat = res.grads.astype(np.float64).reshape(x.shape[0], -1)
    if ord == math.inf:
        n = np.abs(flat).max(axis=1)
    else:
        n = (np.abs(flat) ** ord).sum(axis=1) ** (1 / ord)
    assert (n <= c * (1 + 1e-5)).all()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, kwargs, exc",
    [
        (([np.ones((3, 2)), np.ones((4, 2))], 1.0), {}, ValueError),  # batch mismatch
        ((np.ones((3, 2)), -1.0), {}, ValueError),
        ((np.ones((3, 2)), float("nan")), {}, ValueError),
        (([np.ones((3, 2)), np.ones((3,))], [1.0, 2.0, 3.0]), {"per_layer": True}, ValueError),
        (([np.ones((3, 2)), np.ones((3,))], [1.0, 2.0]), {}, ValueError),  # list w/o per_layer
        ((np.ones((3, 2)), 1.0), {"reduce": "max"}, ValueError),
        ((np.ones((3, 2)), 1.0), {"reduce": 0}, ValueError),
        ((np.ones((3, 2)), 1.0), {"ord": 0}, ValueError),
        ((np.ones((3, 2)), 1.0), {"eps": -1.0}, ValueError),
        ((np.ones((3, 2), np.int64), 1.0), {}, TypeError),
        ((np.ones((3, 2), np.complex64), 1.0), {}, TypeError),
        ((np.ones(()), 1.0), {}, ValueError),
        # an empty batch (B = 0) is valid input: tests/api/test_per_sample_empty.py
        (([], 1.0), {}, ValueError),
        (([np.ones((3, 2)), torch.ones(3, 2)], 1.0), {}, TypeError),
        (([torch.ones(3, 2), torch.ones(3, 2, dtype=torch.int32)], 1.0), {}, TypeError),
    ],
)
def test_bad_input_raises_before_anything(args, kwargs, exc):
    items = args[0] if isinstance(args[0], list) else [args[0]]
    before = [a.copy() if isinstance(a, np.ndarray) else a.clone() for a in items]
    with pytest.raises(exc):
        clip_per_sample(*args, **kwargs)
    for a, b in zip(items, before):
        assert (a == b).all()


def test_per_layer_bound_count_message():
    with pytest.raises(ValueError, match=r"one max_norm, or one per array \(1\), got 2"):
        clip_per_sample([np.ones((3, 2))], [1.0, 2.0], per_layer=True)


def test_gpu_route_without_a_gpu_raises_before_any_work(monkeypatch):
    """Device arrays on a machine without a usable GPU: a clear GPUUnavailableError
    (the GPU route itself is tested in test_gpu_per_sample*.py)."""
    import fastclip
    from fastclip import _dispatch

    try:
        _dispatch.check_gpu_available()
    except fastclip.GPUUnavailableError:
        pass
    else:
        pytest.skip("a GPU is usable here: tests/gpu/test_gpu_per_sample.py runs the route")
    monkeypatch.setattr(_dispatch, "route_of", lambda x: _dispatch.ROUTE_GPU)
    x = np.ones((2, 2))
    with pytest.raises(fastclip.GPUUnavailableError, match="GPU route"):
        clip_per_sample(x, 1.0)
    assert np.all(x == 1.0)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize(
    ("lib", "dtype"), [("numpy", "float32"), ("torch", "float32"), ("torch", "bfloat16")]
)
def test_factors_beyond_float32_beside_ordinary_ones_are_summed(dtype, lib, reduce):
    """Samples of norm ~1e20 and ~1e-23 clipped to 1e-25: factors 5e-46 and 5e-3 in
    one batch.  The weighted sum takes 32- and 16-bit rows with float32 factors, where
    5e-46 is 0: those rows dropped out of the sum (found by running the CUDA
    per-sample kernels host-compiled against this route).  Now they are summed in
    groups, each factor rescaled into range: the float64 oracle's sum, within the
    clipped rows' rounding."""
    rng = np.random.default_rng(5)
    x64 = rng.standard_normal((6, 41))
    x64[1] *= 1e20
    x64[3] *= 1e-20
    x64[4] *= 1e-23
    x = torch.tensor(x64, dtype=getattr(torch, dtype)) if lib == "torch" else x64.astype(dtype)
    xs = to_f64(x)
    want = ref.clip_per_sample([xs], 1e-25, 2, False, reduce, 0.0)[0][0]
    mags = np.abs(ref.clip_per_sample([xs], 1e-25, 2, False, None, 0.0)[0][0]).sum(axis=0)
    got = to_f64(clip_per_sample(x, 1e-25, eps=0.0, reduce=reduce).grads)
    scale = 1.0 / 6 if reduce == "mean" else 1.0
    tol = (1e-6 if dtype == "float32" else 2e-2) * mags * scale
    assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want) / (mags * scale))
    assert np.max(np.abs(want)) > 0 and np.max(np.abs(got - want)) < 0.1 * np.max(np.abs(want))
