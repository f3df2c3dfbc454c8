"""Parity with the real peer libraries, run side by side with fastclip: optax and Opacus.

This file owns parity with optax and Opacus themselves; the float64 transcriptions of
their formulas are checked in tests/api/.

``test_per_sample.py``, ``test_adaptive.py`` and ``test_clip_global.py`` check
fastclip against hand transcriptions of the peers' formulas; here the peers
themselves run on the same data (optax under ``jax.jit`` on JAX's CPU device,
as in training; Opacus on torch CPU) and the values are compared.  Each
library is guarded by its own ``pytest.importorskip`` inside a fixture, so the
Opacus tests run without JAX and the optax tests without Opacus.

Tolerances: float32 results agree to ~1e-6 relative (the peers sum their norms
in float32, fastclip in float64 blocks: their norms differ by a few 1e-7);
float64 results to ~1e-13.  JAX's float64 is switched on only inside the
float64 tests (``jax.enable_x64``), then restored.

Needs (test extras): ``jax`` (CPU build), ``optax``, ``opacus`` (and torch).
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Iterator

import numpy as np
import pytest

import fastclip
from fastclip.adaptive import AGC
from fastclip.optim import adamw_step_

DTYPES = ["float32", "float64"]
#: Relative agreement of results that are one formula apart only in rounding.
RTOL = {"float32": 1e-6, "float64": 1e-13}


# ------------------------------------------------------------------ imports


@pytest.fixture(scope="module")
def jx() -> types.SimpleNamespace:
    """jax, jax.numpy and optax, or a skip (imports that warn do not fail the tests)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        jax = pytest.importorskip("jax")
        optax = pytest.importorskip("optax")
        import jax.numpy as jnp
    return types.SimpleNamespace(jax=jax, jnp=jnp, optax=optax)


@contextlib.contextmanager
def jax_precision(jx: types.SimpleNamespace, dtype: str) -> Iterator[None]:
    """Run JAX on its CPU device, with float64 enabled for ``dtype == "float64"`` only.

    ``jax.enable_x64`` is a context manager: the global flag is restored on exit.
    """
    jax = jx.jax
    enable_x64 = getattr(jax, "enable_x64", None)
    if dtype == "float64":
        if enable_x64 is None:  # older JAX: the experimental spelling
            enable_x64 = jax.experimental.enable_x64
        x64: contextlib.AbstractContextManager[object] = enable_x64(True)
    else:
        x64 = contextlib.nullcontext()
    with x64, jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="module")
def opacus() -> types.SimpleNamespace:
    """torch, opacus.GradSampleModule and the DP optimizers, or a skip."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch = pytest.importorskip("torch")
        pytest.importorskip("opacus")
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
    return types.SimpleNamespace(
        torch=torch,
        GradSampleModule=GradSampleModule,
        DPOptimizer=DPOptimizer,
        DPPerLayerOptimizer=DPPerLayerOptimizer,
    )


# ------------------------------------------------------------------ helpers

#: HWIO conv kernel, [in, out] dense kernel, bias: optax/Flax layouts.
SHAPES = [(3, 3, 4, 8), (16, 32), (32,)]


def f64(x: object) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()  # type: ignore[attr-defined]
    return np.array(x, dtype=np.float64)


def rel_err(actual: object, expected: object) -> float:
    """Norm-wise relative error ``||a - e|| / ||e||`` in float64."""
    a, e = f64(actual), f64(expected)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300))


def assert_close(actual: object, expected: object, rtol: float) -> None:
    """Element-wise ``|a - e| <= rtol |e|`` (products of one factor: no cancellation)."""
    a, e = f64(actual), f64(expected)
    assert a.shape == e.shape, (a.shape, e.shape)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=0)


def random_grads(seed: int, dtype: str, shapes: list[tuple[int, ...]] = SHAPES) -> list:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


# ------------------------------------------------------- optax: global norm


@pytest.mark.parametrize("dtype", DTYPES)
def test_optax_global_norm(jx, dtype: str) -> None:
    gs = random_grads(0, dtype)
    exact = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in gs)))
    with jax_precision(jx, dtype):
        jgs = [jx.jnp.asarray(g) for g in gs]
        tree_norm = jx.jax.jit(jx.optax.tree.norm)(jgs)
        with warnings.catch_warnings():  # optax.global_norm: deprecated for optax.tree.norm
            warnings.simplefilter("ignore", DeprecationWarning)
            old_norm = jx.jax.jit(jx.optax.global_norm)(jgs)
    assert str(tree_norm.dtype) == dtype
    ours = fastclip.global_norm(gs)
    assert ours.dtype == np.dtype(dtype)
    assert float(ours) == pytest.approx(float(tree_norm), rel=RTOL[dtype])
    assert float(ours) == pytest.approx(float(old_norm), rel=RTOL[dtype])
    # fastclip sums in float64 blocks: at least as close to the exact norm as optax
    assert abs(float(ours) - exact) <= abs(float(tree_norm) - exact) + np.finfo(dtype).eps * exact


# ---------------------------------------------- optax: clip_by_global_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [0.3, 0.999, 2.0], ids=["clip", "clip-barely", "no-clip"])
def test_optax_clip_by_global_norm(jx, dtype: str, ratio: float) -> None:
    """optax: ``t`` if ``n < c`` else ``t / n * c``; fastclip with ``eps=0``: ``t * min(1, c/n)``."""
    gs = random_grads(1, dtype)
    norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in gs)))
    max_norm = ratio * norm
    with jax_precision(jx, dtype):
        tx = jx.optax.clip_by_global_norm(max_norm)
        jgs = [jx.jnp.asarray(g) for g in gs]
        want, _ = jx.jax.jit(tx.update)(jgs, tx.init(jgs))
        want = [np.asarray(w) for w in want]
    got, total = fastclip.clip_by_global_norm(gs, max_norm, eps=0)
    assert float(total) == pytest.approx(norm, rel=RTOL[dtype])
    for a, w, g in zip(got, want, gs):
        assert a.dtype == w.dtype == g.dtype
        if ratio > 1:
            np.testing.assert_array_equal(a, g)  # untouched: coefficient exactly 1
            np.testing.assert_array_equal(w, g)
        else:
            assert_close(a, w, RTOL[dtype])
    if ratio < 1:
        assert float(fastclip.global_norm(got)) == pytest.approx(max_norm, rel=RTOL[dtype])


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [("float64", 1.0), ("float32", 1e-4)],
    ids=["float64-norm28", "float32-norm3e-3"],
)
def test_optax_clip_by_global_norm_default_eps_is_the_formula(jx, dtype, scale) -> None:
    """With the default ``eps=1e-6`` fastclip differs from optax by exactly ``n / (n + eps)``.

    At ``n ~ 28`` that is 3.5e-8 (visible in float64 only); at ``n ~ 3e-3`` it is
    3e-4, visible in float32: the difference is the documented eps, not a bug.
    """
    gs = [g * np.asarray(scale, dtype) for g in random_grads(2, dtype)]
    norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in gs)))
    max_norm = norm / 4
    with jax_precision(jx, dtype):
        tx = jx.optax.clip_by_global_norm(max_norm)
        jgs = [jx.jnp.asarray(g) for g in gs]
        want, _ = jx.jax.jit(tx.update)(jgs, tx.init(jgs))
        want = [np.asarray(w) for w in want]
    got, _ = fastclip.clip_by_global_norm(gs, max_norm)  # eps=1e-6
    predicted = norm / (norm + 1e-6)
    visible = 1 - predicted  # the relative gap the formula predicts
    assert visible > 100 * RTOL[dtype]
    for a, w in zip(got, want):
        assert_close(a, f64(w) * predicted, RTOL[dtype])
        assert rel_err(a, w) == pytest.approx(visible, rel=0.01)


# --------------------------------------------------------- optax: clip value


@pytest.mark.parametrize("dtype", DTYPES)
def test_optax_clip_vs_clip_by_value(jx, dtype: str) -> None:
    gs = random_grads(3, dtype)
    gs[0].flat[:3] = [0.5, -0.5, 0.0]  # on the bound: kept
    with jax_precision(jx, dtype):
        tx = jx.optax.clip(0.5)
        jgs = [jx.jnp.asarray(g) for g in gs]
        want, _ = jx.jax.jit(tx.update)(jgs, tx.init(jgs))
    for g, w in zip(gs, want):
        a = fastclip.clip_by_value(g, -0.5, 0.5)
        assert a.dtype == g.dtype
        assert 0 < np.count_nonzero(np.abs(g) > 0.5) < g.size  # some clamped, some not
        np.testing.assert_array_equal(a, np.asarray(w))


# ---------------------------------------------------------------- optax: AGC


#: optax ``unitwise_norm`` layouts: HWIO conv (units = last axis), [in, out]
#: dense, multi-head [in, heads, dim] (rank 3 reduces axis 0 in optax's code),
#: a [1, n] kernel (squeezed to a vector: one unit) and a bias (one unit).
AGC_SHAPES = [(3, 3, 4, 8), (16, 32), (16, 4, 8), (1, 32), (32,)]


def agc_data(dtype: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(4)
    ps, gs = [], []
    for s in AGC_SHAPES:
        # per-unit scales along the last (output) axis: 1e-5 (below the eps floor) to 10
        unit = rng.choice([1e-5, 0.1, 1.0, 10.0], size=s[-1])
        ps.append((rng.standard_normal(s) * unit).astype(dtype))
        gs.append(
            (rng.standard_normal(s) * rng.choice([1e-3, 1e-2, 0.3], size=s[-1])).astype(dtype)
        )
    ps[-1][:] = 0  # a zero-initialised bias: the eps floor decides
    return ps, gs


@pytest.mark.parametrize("dtype", DTYPES)
def test_optax_adaptive_grad_clip(jx, dtype: str) -> None:
    clipping, eps = 0.05, 1e-3
    ps, gs = agc_data(dtype)
    with jax_precision(jx, dtype):
        tx = jx.optax.adaptive_grad_clip(clipping, eps)
        jps = [jx.jnp.asarray(p) for p in ps]
        want, _ = jx.jax.jit(tx.update)([jx.jnp.asarray(g) for g in gs], tx.init(jps), jps)
        want = [np.asarray(w) for w in want]
    agc = AGC(clipping=clipping, eps=eps, axis="optax")
    out, total_oop = agc.clip(gs, ps)  # out of place
    inplace = [g.copy() for g in gs]
    total = agc(inplace, ps)  # in place, returns the norm before clipping
    n_clipped_units = n_units = 0
    for g, w, a, b in zip(gs, want, out, inplace):
        assert a.dtype == b.dtype == w.dtype == g.dtype
        assert_close(a, w, RTOL[dtype])
        assert_close(b, w, RTOL[dtype])
        changed = (w != g).reshape(-1, g.shape[-1]).any(axis=0) if g.ndim > 1 else (w != g).any()
        n_clipped_units += int(np.count_nonzero(changed))
        n_units += int(np.size(changed))
    assert 0 < n_clipped_units < n_units  # some units clipped, some kept
    exact = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in gs)))
    assert float(total) == float(total_oop) == pytest.approx(exact, rel=RTOL[dtype])


# ---------------------------------------- optax: per_example_global_norm_clip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["zero", "mid", "none"])
def test_optax_per_example_global_norm_clip(jx, dtype: str, which: str) -> None:
    """optax returns ``(sum of clipped per-example grads, number clipped)``.

    Its multiplier is ``nan_to_num(min(c / n, 1), nan=1)`` (no eps), so
    fastclip runs with ``eps=0``.  A zero sample gets multiplier 1 in both.
    """
    batch = 16
    rng = np.random.default_rng(5)
    sample_scale = rng.choice([0.01, 0.1, 1.0, 10.0], size=batch)
    gs = [
        (rng.standard_normal((batch, *s)) * sample_scale.reshape((-1,) + (1,) * len(s))).astype(
            dtype
        )
        for s in SHAPES
    ]
    for g in gs:
        g[3] = 0  # a zero sample
    norms = np.sqrt(sum(np.sum(g.astype(np.float64).reshape(batch, -1) ** 2, axis=1) for g in gs))
    s = np.unique(norms)
    # half way between two sample norms: no sample sits on the bound (the count is exact)
    c = {"zero": 0.0, "mid": float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2, "none": 1e9}[which]
    with jax_precision(jx, dtype):
        summed, n_clipped = jx.jax.jit(jx.optax.per_example_global_norm_clip)(
            [jx.jnp.asarray(g) for g in gs], c
        )
    res = fastclip.clip_per_sample(gs, c, eps=0)
    expected_count = {"zero": batch - 1, "mid": int(np.sum(norms > c)), "none": 0}[which]
    assert int(n_clipped) == res.n_clipped == expected_count
    if which == "mid":
        assert 0 < res.n_clipped < batch - 1
    for a, w in zip(res.grads, summed):
        assert a.dtype == np.dtype(dtype) and str(w.dtype) == dtype
        if which == "zero":
            assert not np.any(a) and not np.any(np.asarray(w))
        else:  # a sum over samples: norm-wise (elements may cancel)
            assert rel_err(a, w) <= RTOL[dtype]
    np.testing.assert_allclose(f64(res.norms), norms, rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("uniform", [True, False])
def test_optax_per_example_layer_norm_clip(jx, dtype: str, uniform: bool) -> None:
    """optax's per-layer variant is ``clip_per_sample(per_layer=True)`` with its
    bounds: ``C / sqrt(K)`` (uniform) or ``C * sqrt(D_k / D)``; its per-layer
    clipped counts follow from fastclip's ``[K, B]`` norms."""
    batch = 12
    rng = np.random.default_rng(6)
    scale = rng.choice([0.01, 0.1, 1.0, 10.0], size=batch)
    gs = [
        (rng.standard_normal((batch, *s)) * scale.reshape((-1,) + (1,) * len(s))).astype(dtype)
        for s in SHAPES
    ]
    c = 3.0
    sizes = np.array([np.prod(s) for s in SHAPES], np.float64)
    bounds = [c / np.sqrt(len(gs))] * len(gs) if uniform else list(c * np.sqrt(sizes / sizes.sum()))
    with jax_precision(jx, dtype):
        summed, counts = jx.jax.jit(
            jx.optax.per_example_layer_norm_clip, static_argnames="uniform"
        )([jx.jnp.asarray(g) for g in gs], c, uniform=uniform)
    res = fastclip.clip_per_sample(gs, bounds, per_layer=True, eps=0)
    norms = f64(res.norms)
    got_counts = [int(np.sum(norms[k] > bounds[k])) for k in range(len(gs))]
    assert got_counts == [int(n) for n in counts]
    assert 0 < sum(got_counts) < batch * len(gs)  # some samples clipped, some kept
    for a, w in zip(res.grads, summed):
        assert a.dtype == np.dtype(dtype) and str(w.dtype) == dtype
        assert rel_err(a, w) <= RTOL[dtype]


# -------------------------------------------- optax: clip + adamw, 20 steps


@pytest.mark.parametrize("dtype", DTYPES)
def test_optax_chain_clip_adamw_vs_adamw_step_(jx, dtype: str) -> None:
    """20 steps of ``chain(clip_by_global_norm(c), adamw(...))`` vs ``adamw_step_(max_norm=c)``.

    optax's AdamW is torch's: ``scale_by_adam`` gives ``m_hat / (sqrt(v_hat) + eps)``
    with both bias corrections, ``add_decayed_weights`` adds ``wd * p`` (the
    parameter before the step) and the learning rate multiplies both, so
    ``p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)``, torch's decoupled
    decay (optax's docstring says so too).  optax's clip has no eps:
    ``clip_eps=0``.  The two differ in rounding order only, so the tolerance
    is one rounding of the largest parameter per step (float64: ~1e-14).
    """
    lr, b1, b2, eps, wd, c, steps = 1e-2, 0.9, 0.99, 1e-8, 0.05, 1.0, 20
    rng = np.random.default_rng(6)
    ps = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    mine = [p.copy() for p in ps]
    m = [np.zeros_like(p) for p in ps]
    v = [np.zeros_like(p) for p in ps]
    clipped = 0
    with jax_precision(jx, dtype):
        tx = jx.optax.chain(
            jx.optax.clip_by_global_norm(c), jx.optax.adamw(lr, b1, b2, eps, weight_decay=wd)
        )
        theirs = [jx.jnp.asarray(p) for p in ps]
        state = tx.init(theirs)
        update = jx.jax.jit(tx.update)
        for t in range(1, steps + 1):
            scale = 3.0 if t % 3 else 0.01  # norms ~100 (clipped) and ~0.3 (not clipped)
            gs = [(rng.standard_normal(s) * scale).astype(dtype) for s in SHAPES]
            upd, state = update([jx.jnp.asarray(g) for g in gs], state, theirs)
            theirs = jx.optax.apply_updates(theirs, upd)
            norm = adamw_step_(
                mine, gs, m, v, step=t, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                max_norm=c, clip_eps=0.0,
            )  # fmt: skip
            clipped += float(norm) > c
        adam_state = state[1][0]
        theirs = [np.asarray(x) for x in theirs]
        mu = [np.asarray(x) for x in adam_state.mu]
        nu = [np.asarray(x) for x in adam_state.nu]
    assert 0 < clipped < steps
    assert int(adam_state.count) == steps
    tol = steps * np.finfo(dtype).eps
    for p0, a, w in zip(ps, mine, theirs):
        assert a.dtype == w.dtype == np.dtype(dtype)
        assert rel_err(w, p0) > 1e-3  # the parameters moved
        np.testing.assert_allclose(a, w, rtol=0, atol=tol * float(np.abs(w).max()))
    for a, w in zip(m + v, mu + nu):
        assert rel_err(a, w) <= tol


# ------------------------------------------------------------------- Opacus


def opacus_setup(ns: types.SimpleNamespace, dtype: str, seed: int = 0):
    """A GradSampleModule MLP after one backward of a batch of 32: (module, params)."""
    torch = ns.torch
    tdt = getattr(torch, dtype)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    ).to(tdt)
    gsm = ns.GradSampleModule(model)
    # inputs over 3 decades: per-sample gradient norms from ~0.5 to ~30
    x = torch.randn(32, 20, dtype=tdt) * torch.logspace(-2, 1, 32, dtype=tdt)[:, None]
    # an input that requires grad keeps torch's full-backward-hook UserWarning
    # ("no inputs require gradients") quiet; the parameters' gradients are unchanged
    x.requires_grad_(True)
    y = torch.randint(0, 4, (32,))
    torch.nn.functional.cross_entropy(gsm(x), y).backward()
    params = list(gsm.parameters())
    for p in params:
        assert tuple(p.grad_sample.shape) == (32, *p.shape)
    return gsm, params


def median_bound(norms: np.ndarray) -> float:
    """The median of 32 norms: half the samples clipped, none on the bound."""
    s = np.sort(norms)
    return float((s[15] + s[16]) / 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opacus_flat_clip_and_accumulate(opacus, dtype: str) -> None:
    torch = opacus.torch
    _, params = opacus_setup(opacus, dtype)
    gs = [p.grad_sample.detach().clone() for p in params]
    flat = np.concatenate([f64(g).reshape(32, -1) for g in gs], axis=1)
    norms = np.linalg.norm(flat, axis=1)
    c = median_bound(norms)
    opt = opacus.DPOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=c,
        expected_batch_size=32,
    )
    opt.clip_and_accumulate()
    res = fastclip.clip_per_sample(gs, c)  # eps=1e-6: Opacus's
    assert res.n_clipped == int(np.sum(norms > c)) == 16
    np.testing.assert_allclose(f64(res.norms), norms, rtol=RTOL[dtype])
    for p, a in zip(params, res.grads):
        assert isinstance(a, torch.Tensor) and a.dtype == p.summed_grad.dtype
        assert rel_err(a, p.summed_grad) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_opacus_step_mean_gradient(opacus, dtype: str) -> None:
    """``DPOptimizer.step()`` without noise leaves ``p.grad = summed / 32``: ``reduce="mean"``."""
    torch = opacus.torch
    _, params = opacus_setup(opacus, dtype, seed=1)
    gs = [p.grad_sample.detach().clone() for p in params]
    before = [p.detach().clone() for p in params]
    c = 2.0
    lr = 0.1
    opt = opacus.DPOptimizer(
        torch.optim.SGD(params, lr=lr),
        noise_multiplier=0.0,
        max_grad_norm=c,
        expected_batch_size=32,
    )
    opt.step()
    res = fastclip.clip_per_sample(gs, c, reduce="mean")
    assert 0 < res.n_clipped < 32
    for p, p0, a in zip(params, before, res.grads):
        assert rel_err(a, p.grad) <= RTOL[dtype]
        assert rel_err(p0 - lr * a, p.detach()) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_opacus_per_layer_clip_and_accumulate(opacus, dtype: str) -> None:
    torch = opacus.torch
    _, params = opacus_setup(opacus, dtype, seed=2)
    gs = [p.grad_sample.detach().clone() for p in params]
    layer_norms = np.stack([np.linalg.norm(f64(g).reshape(32, -1), axis=1) for g in gs])
    bounds = [median_bound(n) for n in layer_norms]
    bounds[-1] = float(layer_norms[-1].max()) * 2  # a layer where nothing is clipped
    opt = opacus.DPPerLayerOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=bounds,
        expected_batch_size=32,
    )
    opt.clip_and_accumulate()
    res = fastclip.clip_per_sample(gs, bounds, per_layer=True)
    assert tuple(res.norms.shape) == (len(params), 32)
    np.testing.assert_allclose(f64(res.norms), layer_norms, rtol=RTOL[dtype])
    clipped = layer_norms > np.array(bounds)[:, None]
    assert res.n_clipped == int(np.count_nonzero(clipped.any(axis=0)))
    assert 0 < res.n_clipped < 32 and not clipped[-1].any()
    for p, a in zip(params, res.grads):
        assert rel_err(a, p.summed_grad) <= RTOL[dtype]
    # the unclipped layer is the plain sum
    assert rel_err(res.grads[-1], gs[-1].sum(0)) <= RTOL[dtype]
