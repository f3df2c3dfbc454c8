"""Parity gaps with optax and TensorFlow, each checked against the peer's code or formula.

* ``AGC(axis="optax")`` against ``optax.adaptive_grad_clip`` itself (optax >= 0.2.7
  reduces 5-D DHWIO kernels over axes (0, 1, 2, 3)); ``"optax-legacy"`` keeps the
  rank <= 4 rule of optax <= 0.2.6.
* ``PerSampleClipResult.n_clipped_per_layer`` against
  ``optax.per_example_layer_norm_clip``'s per-layer counts.
* ``clip_by_block_rms`` against ``optax.clip_by_block_rms``.
* ``clip_by_average_norm`` against TensorFlow's formula
  (``tensorflow/python/ops/clip_ops.py``: ``t * clip_norm * min(n * rsqrt(sum(t*t)),
  1 / clip_norm)``), written in float64 NumPy (TensorFlow is not installed).
* Array-valued bounds (TensorFlow's tensor bounds): tests/api/test_array_bounds.py.

optax runs under ``jax.jit`` on JAX's CPU device; float64 only inside
``jax.enable_x64``.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
from _backends import CPU, params

import fastclip
from fastclip.adaptive import AGC

RTOL = {"float32": 2e-6, "float64": 1e-12}


@pytest.fixture(scope="module")
def jx():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        jax = pytest.importorskip("jax")
        optax = pytest.importorskip("optax")
        import jax.numpy as jnp
    return jax, jnp, optax


@contextlib.contextmanager
def _precision(jax, dtype: str):
    x64 = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    with x64, jax.default_device(jax.devices("cpu")[0]):
        yield


def _optax_update(jx, tx, updates, params=None, dtype="float32"):
    jax, jnp, _ = jx
    with _precision(jax, dtype):
        us = [jnp.asarray(u) for u in updates]
        ps = None if params is None else [jnp.asarray(p) for p in params]
        out, _ = jax.jit(tx.update)(us, tx.init(ps if ps is not None else us), ps)
        return [np.asarray(o) for o in out]


# ------------------------------------------------------------------ AGC


#: 1-D bias, squeezed vector [1, n], dense [in, out], multi-head, HWIO, DHWIO (Conv3D).
AGC_SHAPES = [(7,), (1, 9), (6, 5), (4, 3, 5), (3, 3, 4, 6), (2, 3, 3, 4, 5)]


def _agc_data(dtype: str, shapes=AGC_SHAPES):
    rng = np.random.default_rng(3)
    ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
    # per-unit gradient scales over four decades: some units clipped, some kept
    gs = []
    for s in shapes:
        g = rng.standard_normal(s) * rng.choice([1e-4, 1e-3, 0.1, 3.0], size=s[-1:])
        gs.append(g.astype(dtype))
    return ps, gs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_agc_optax_layout_against_optax_up_to_5d(jx, dtype: str) -> None:
    ps, gs = _agc_data(dtype)
    want = _optax_update(jx, jx[2].adaptive_grad_clip(0.05, 1e-3), gs, ps, dtype)
    got, _ = AGC(clipping=0.05, eps=1e-3, axis="optax").clip(gs, ps)
    inplace = [g.copy() for g in gs]
    AGC(clipping=0.05, eps=1e-3, axis="optax")(inplace, ps)
    changed = 0
    for g, w, a, b in zip(gs, want, got, inplace):
        assert a.dtype == w.dtype == g.dtype
        np.testing.assert_allclose(a, w, rtol=RTOL[dtype], atol=0)
        np.testing.assert_allclose(b, w, rtol=RTOL[dtype], atol=0)
        changed += int(np.any(w != g))
    assert 0 < changed  # the data clips some units (a test that cannot pass trivially)
    # the 5-D kernel really has one unit per output channel (axes (0, 1, 2, 3) reduced)
    g5, w5 = gs[-1].astype(np.float64), want[-1].astype(np.float64)
    ratio = np.divide(w5, g5, out=np.ones_like(g5), where=g5 != 0)
    assert np.allclose(ratio, ratio[0, 0, 0, 0][None, None, None, None, :], rtol=1e-5)


def test_agc_legacy_layout_matches_optax_below_5d_and_refuses_5d(jx) -> None:
    ps, gs = _agc_data("float32", AGC_SHAPES[:-1])
    want = _optax_update(jx, jx[2].adaptive_grad_clip(0.05, 1e-3), gs, ps)
    got, _ = AGC(clipping=0.05, axis="optax-legacy").clip(gs, ps)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, rtol=RTOL["float32"], atol=0)
    p5 = np.ones(AGC_SHAPES[-1], np.float32)
    before = p5.copy()
    with pytest.raises(ValueError, match=r"optax-legacy.*rank <= 4.*axis='optax'"):
        AGC(axis="optax-legacy")([p5], [p5])
    np.testing.assert_array_equal(p5, before)  # nothing written


@pytest.mark.parametrize("axis", [(0, 1), (1,), (0, 2, 3)])
def test_agc_explicit_axes_against_optax_axis_argument(jx, axis) -> None:
    shapes = [(3, 4, 5, 2)]
    ps, gs = _agc_data("float32", shapes)
    want = _optax_update(jx, jx[2].adaptive_grad_clip(0.05, 1e-3, axis=axis), gs, ps)
    got, _ = AGC(clipping=0.05, axis=axis).clip(gs, ps)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL["float32"], atol=0)


def test_agc_layout_names_round_trip_through_state_dict() -> None:
    agc = AGC(axis="optax-legacy")
    again = AGC()
    again.load_state_dict(agc.state_dict())
    assert again.axis == "optax-legacy"
    with pytest.raises(ValueError, match="optax-legacy"):
        AGC(axis="optax-2")


# ---------------------------------------------------- per-layer counts


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("uniform", [True, False])
def test_per_layer_counts_against_optax(jx, dtype: str, uniform: bool) -> None:
    jax, jnp, optax = jx
    batch = 16
    rng = np.random.default_rng(11)
    shapes = [(3, 3, 2), (8,), (4, 5)]
    gs = []
    for k, s in enumerate(shapes):
        scale = rng.choice([0.01, 0.1, 1.0, 10.0], size=batch) * (k + 1)
        g = rng.standard_normal((batch, *s)) * scale.reshape((-1,) + (1,) * len(s))
        gs.append(g.astype(dtype))
    c = 2.0
    with _precision(jax, dtype):
        summed, counts = optax.per_example_layer_norm_clip(
            [jnp.asarray(g) for g in gs], c, uniform=uniform
        )
        counts = [int(n) for n in counts]
        summed = [np.asarray(s) for s in summed]
    sizes = [math.prod(s) for s in shapes]
    if uniform:
        bounds = [c / math.sqrt(len(gs))] * len(gs)
    else:
        bounds = [c * math.sqrt(d / sum(sizes)) for d in sizes]
    res = fastclip.clip_per_sample(gs, bounds, per_layer=True, eps=0.0)
    g, norms, n = res  # three-field unpacking unchanged
    assert res.n_clipped_per_layer == tuple(counts)
    assert 0 < min(counts) and max(counts) < batch  # every layer clips some, keeps some
    assert n == int(np.any(np.asarray(norms) > np.asarray(bounds)[:, None], axis=0).sum())
    for a, w in zip(g, summed):
        np.testing.assert_allclose(a, w, rtol=10 * RTOL[dtype], atol=1e-6 * np.abs(w).max())


def test_flat_counts_repeat_n_clipped_and_hand_made_results_refuse() -> None:
    rng = np.random.default_rng(0)
    gs = [rng.standard_normal((9, 3)), rng.standard_normal((9,))]
    res = fastclip.clip_per_sample(gs, 1.0)
    norms = np.sqrt(sum((g.reshape(9, -1) ** 2).sum(axis=1) for g in gs))
    assert res.n_clipped == int(np.sum(1.0 / (norms + 1e-6) < 1.0))
    assert res.n_clipped_per_layer == (res.n_clipped, res.n_clipped)
    with pytest.raises(AttributeError, match="clip_per_sample"):
        _ = res._replace(n_clipped=0).n_clipped_per_layer


# ------------------------------------------------------- clip_by_block_rms


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.0, math.inf])
def test_block_rms_against_optax(jx, dtype: str, threshold: float) -> None:
    rng = np.random.default_rng(5)
    us = [
        (rng.standard_normal(s) * sc).astype(dtype)
        for s, sc in [((4, 5), 2.0), ((7,), 0.1), ((2, 3, 4), 1.0)]
    ]
    if threshold > 0:  # optax's 0/0 with threshold 0 is NaN; fastclip documents zeros
        us.append(np.zeros((3, 2), dtype))
    want = _optax_update(jx, jx[2].clip_by_block_rms(threshold), us, dtype=dtype)
    got = fastclip.clip_by_block_rms(us, threshold)
    copies = [u.copy() for u in us]
    rms = fastclip.clip_by_block_rms_(copies, threshold)
    for u, w, a, b, r in zip(us, want, got, copies, rms):
        assert a.dtype == w.dtype == np.dtype(dtype)
        np.testing.assert_allclose(a, w, rtol=RTOL[dtype], atol=0)
        np.testing.assert_allclose(b, w, rtol=RTOL[dtype], atol=0)
        exact = np.sqrt(np.mean(u.astype(np.float64) ** 2))
        np.testing.assert_allclose(float(r), exact, rtol=RTOL[dtype])
    single = fastclip.clip_by_block_rms(us[0], threshold)
    np.testing.assert_allclose(single, want[0], rtol=RTOL[dtype], atol=0)


def test_block_rms_threshold_zero_gives_zeros_and_bad_input_writes_nothing() -> None:
    out = fastclip.clip_by_block_rms([np.zeros(3), np.ones(2)], 0.0)
    np.testing.assert_array_equal(out[0], np.zeros(3))
    np.testing.assert_array_equal(out[1], np.zeros(2))
    good = np.full(4, 10.0)
    frozen = np.full(4, 10.0)
    frozen.flags.writeable = False
    with pytest.raises(ValueError):
        fastclip.clip_by_block_rms_([good, frozen], 1.0)
    np.testing.assert_array_equal(good, np.full(4, 10.0))  # the first one untouched
    with pytest.raises(TypeError, match=r"x\[1\]"):
        fastclip.clip_by_block_rms_([good, np.ones(3, np.int32)], 1.0)
    np.testing.assert_array_equal(good, np.full(4, 10.0))
    with pytest.raises(ValueError, match=r"fastclip\.clip_by_block_rms: threshold"):
        fastclip.clip_by_block_rms(good, -1.0)


# ---------------------------------------------------- clip_by_average_norm


def tf_clip_by_average_norm(t: np.ndarray, clip_norm: float) -> np.ndarray:
    """TensorFlow's ``clip_by_average_norm`` (clip_ops.py) in float64 NumPy."""
    t = np.asarray(t, np.float64)
    n = t.size
    with np.errstate(divide="ignore"):
        l2norm_inv = 1.0 / np.sqrt(np.sum(t * t))
    return t * clip_norm * np.minimum(l2norm_inv * n, 1.0 / clip_norm)


@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ("float32", "float64")))
@pytest.mark.parametrize("clip_norm", [1e-3, 0.05, 10.0])
def test_average_norm_against_tensorflow(backend, dtype, clip_norm) -> None:
    data = np.random.default_rng(2).standard_normal((6, 5)) * 0.4
    x = backend.asarray(data, dtype)
    want = tf_clip_by_average_norm(backend.round_to(data, dtype), clip_norm)
    got = fastclip.clip_by_average_norm(x, clip_norm)
    backend.assert_array(got, x, dtype, (6, 5))
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=RTOL[dtype], atol=0)
    if backend.writeable:
        avg = fastclip.clip_by_average_norm_(x, clip_norm)
        np.testing.assert_allclose(backend.to_numpy(x), want, rtol=RTOL[dtype], atol=0)
        exact = np.linalg.norm(backend.round_to(data, dtype)) / data.size
        np.testing.assert_allclose(float(backend.to_numpy(avg)), exact, rtol=RTOL[dtype])
    else:
        with pytest.raises(ValueError):
            fastclip.clip_by_average_norm_(x, clip_norm)


def test_average_norm_zero_array_and_bad_clip_norm() -> None:
    z = np.zeros(4)
    np.testing.assert_array_equal(
        fastclip.clip_by_average_norm(z, 1.0), tf_clip_by_average_norm(z, 1.0)
    )
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match=r"fastclip\.clip_by_average_norm: clip_norm"):
            fastclip.clip_by_average_norm(np.ones(3), bad)
