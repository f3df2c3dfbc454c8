"""fastclip.adaptive.AGC (adaptive gradient clipping, Brock et al. 2021) against
float64 transcriptions of timm's ``adaptive_clip_grad`` and optax's
``adaptive_grad_clip`` (``tests/reference.py``), on NumPy and torch, in both
unit layouts, with explicit axes and the non-finite policies.

The global-norm clippers (GlobalNormClipper, AutoClip, ZClip) and the
clippers' shared interface (state dicts, pickles, public paths) are in
``test_adaptive.py``; AGC's refusals and data safety in ``test_safety_adaptive.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference

import fastclip
from fastclip.adaptive import AGC

SHAPES = [(), (7,), (1, 9), (6, 4), (3, 4, 5), (8, 3, 3, 3), (3, 3, 4, 8)]


@pytest.mark.parametrize("layout", ["torch", "optax"])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_agc_against_timm_and_optax(layout: str, lib: str, dtype: str) -> None:
    rng = np.random.default_rng(7)
    ref = reference.timm_agc if layout == "torch" else reference.optax_agc
    ps = [rng.normal(size=s) * rng.choice([1e-4, 1.0], size=s) for s in SHAPES]
    ps[1][:] = 0.0  # a zero-initialised vector: the eps floor decides
    gs = [rng.normal(size=s) * 0.05 * rng.choice([0.01, 1.0, 30.0]) for s in SHAPES]
    if lib == "torch":
        torch = pytest.importorskip("torch")
        conv = lambda a: torch.tensor(a, dtype=getattr(torch, dtype))  # noqa: E731
        back = lambda t: t.double().numpy().copy()  # noqa: E731
    else:
        conv = lambda a: np.asarray(a, dtype=dtype)  # noqa: E731
        back = lambda a: np.array(a, np.float64)  # noqa: E731
    P = [conv(p) for p in ps]
    G = [conv(g) for g in gs]
    P_in = [back(p) for p in P]
    G_in = [back(g) for g in G]
    want = [ref(p, g, 0.02, 1e-3) for p, g in zip(P_in, G_in)]
    agc = AGC(clipping=0.02, eps=1e-3, axis=layout)
    new, total_oop = agc.clip(G, P)
    total = agc(G, P)
    rtol = 1e-12 if dtype == "float64" else 2e-6
    for a, b, w in zip(G, new, want):
        np.testing.assert_allclose(back(a), w, rtol=rtol, atol=1e-300)
        np.testing.assert_allclose(back(b), w, rtol=rtol, atol=1e-300)
    expected_total = math.sqrt(sum(float(np.sum(g * g)) for g in G_in))
    assert float(total) == pytest.approx(expected_total, rel=rtol * 10)
    assert float(total_oop) == float(total)


def test_agc_explicit_axes_and_nonfinite() -> None:
    rng = np.random.default_rng(2)
    p, g = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    a = g.copy()
    AGC(0.05, axis=1)([a], [p])
    np.testing.assert_allclose(a, reference.timm_agc(p, g, 0.05, 1e-3), rtol=1e-13)
    bad = g.copy()
    bad[0, 0] = math.nan
    keep = bad.copy()
    agc = AGC(nonfinite="skip")
    agc([bad], [p])
    assert agc.last_step_skipped
    np.testing.assert_array_equal(bad, keep)
    with pytest.raises(fastclip.NonFiniteNormError):
        AGC(nonfinite="error")([bad], [p])
    AGC()([bad], [p])  # propagate: the NaN unit becomes NaN, the others are clipped
    assert np.isnan(bad[0]).all() and np.isfinite(bad[1:]).all()


def test_agc_validates_its_inputs_at_call_time() -> None:
    """Parameters are required, optax's unit layout has no rule past rank 5 and the
    legacy one (optax <= 0.2.6) none past rank 4 (the constructor's argument
    checks are in test_safety_adaptive.py; rank 5 against optax itself in
    test_peer_parity.py)."""
    with pytest.raises(ValueError):
        AGC()([np.ones(2)])  # no params
    with pytest.raises(ValueError, match="rank <= 5"):
        AGC(axis="optax")([np.ones((1, 2, 3, 4, 5, 2))], [np.ones((1, 2, 3, 4, 5, 2))])
    with pytest.raises(ValueError, match="rank <= 4"):
        AGC(axis="optax-legacy")([np.ones((1, 2, 3, 4, 5))], [np.ones((1, 2, 3, 4, 5))])
