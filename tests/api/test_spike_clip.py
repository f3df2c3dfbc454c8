"""fastclip.adaptive.spike_clip / spike_clip_ against a float64 NumPy transcription of
SPAM's masked clip (``galore_torch/SPAM.py``, TianjinYellow/SPAM-Optimizer:
``mask = grad**2 > thres * exp_avg_sq``; ``grad[mask] = grad[mask].sign() *
torch.sqrt(exp_avg_sq[mask] * thres)``), on NumPy, torch and array-api-strict,
with non-finite entries, and refusals that leave every input as it was."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _backends import Backend, to_f64, unchanged

from fastclip.adaptive import spike_clip, spike_clip_


def reference(g, v, thres):
    g = np.array(g, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        mask = g**2 > thres * v
    g[mask] = np.sign(g[mask]) * np.sqrt(v[mask] * thres)
    return g, int(mask.sum())


def data(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(7, 3), (11,), (2, 2, 5)]
    gs = [rng.normal(size=s) for s in shapes]
    vs = [np.abs(rng.normal(size=s)) * 1e-3 for s in shapes]
    gs[0][2, 1] = 40.0  # spikes
    gs[1][4] = -300.0
    gs[2][1, 0, 3] = math.nan
    gs[2][0, 1, 1] = -math.inf
    vs[1][0] = 0.0  # a zero moment: any non-zero entry is a spike
    return gs, vs


@pytest.mark.parametrize(
    "backend", [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT], ids=str
)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("thres", [5000.0, 50.0, 0.0])
def test_spike_clip_matches_spam(backend, dtype, thres):
    if backend.is_torch:
        pytest.importorskip("torch")
    if backend is Backend.ARRAY_API_STRICT:
        pytest.importorskip("array_api_strict")
    gs, vs = data()
    G = [backend.asarray(g, dtype) for g in gs]
    V = [backend.asarray(v, dtype) for v in vs]
    want = [reference(to_f64(g), to_f64(v), thres) for g, v in zip(G, V)]
    out, count = spike_clip(G, V, thres)
    rtol = 1e-15 if dtype == "float64" else 1e-6
    for a, (w, _) in zip(out, want):
        np.testing.assert_allclose(to_f64(a), w, rtol=rtol)
    assert count == sum(n for _, n in want) and count >= 2
    if backend.writeable:
        assert spike_clip_(G, V, thres) == count
        for a, b in zip(G, out):
            np.testing.assert_array_equal(to_f64(a), to_f64(b))


def test_spam_optimizer_clip_agrees_with_spike_clip():
    """SPAMAdamW's clamp against spike_clip on the moments it held before a step: the
    first moment it stores is (1 - beta1) times the clipped gradient."""
    torch = pytest.importorskip("torch")
    from fastclip.torch import SPAMAdamW

    gs, _ = data(3)
    gs = [np.nan_to_num(g, nan=0.0, neginf=-1e3) for g in gs]
    ps = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64)) for g in gs]
    opt = SPAMAdamW(ps, betas=(0.0, 0.5), threshold=10.0, grad_accu_steps=2, delta_t=0)
    for p, g in zip(ps, gs):
        p.grad = torch.tensor(g) * 0.01
    opt.step()
    v = [opt.state[p]["exp_avg_sq"].clone() for p in ps]
    for p, g in zip(ps, gs):
        p.grad = torch.tensor(g)
    opt.step()
    want, _ = spike_clip([torch.tensor(g) for g in gs], v, 10.0)
    for p, w in zip(ps, want):
        np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), w.numpy(), rtol=1e-15)


def test_spike_clip_refusals_leave_the_inputs():
    gs, vs = data()
    gs[1].flags.writeable = False
    with unchanged(*gs, *vs):
        with pytest.raises(ValueError, match=r"fastclip\.adaptive\.spike_clip_: gradient 1"):
            spike_clip_(gs, vs)
        with pytest.raises(ValueError, match="2 gradients for 3 second moments"):
            spike_clip(gs[:2], vs)
        with pytest.raises(ValueError, match="has shape"):
            spike_clip(gs, [vs[0], vs[2], vs[1]])
        with pytest.raises(ValueError, match=r"fastclip\.adaptive\.spike_clip: threshold"):
            spike_clip(gs, vs, -1.0)
