"""Data safety of fastclip.adaptive: a refused call changes nothing, bad arguments are named.

This file owns the refusals of fastclip.adaptive's calls and constructor arguments; the
clippers' values are in test_adaptive.py and test_agc.py, their state dicts (refused
and loaded states) in test_adaptive_state.py.

Every refused call is checked on the bytes of every input and on the clipper's
whole state (``state_dict`` and the ``last_*`` attributes); every accepted one
against float64 NumPy transcriptions of the papers' formulas: AGC (Brock et
al. 2021, arXiv:2102.06171, timm's ``adaptive_clip_grad``), AutoClip
(Seetharaman et al. 2020, arXiv:2007.14469: ``np.percentile`` of the norm
history) and ZClip (Kumar et al. 2025, arXiv:2504.02507, bluorion-com/ZClip's
``zclip.py``), and ``clip_grad_norm_``'s coefficient ``min(1, c / (norm + 1e-6))``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import reference
from _backends import Backend, clipper_state

import fastclip
from fastclip.adaptive import AGC, AutoClip, GlobalNormClipper, ZClip

# ------------------------------------------------------------------ helpers


def raw(backend: Backend, x: Any) -> bytes:
    """The bytes of an array's elements in its own dtype (no float64 conversion)."""
    if backend.is_torch:
        import torch

        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
        return bytes(t.contiguous().numpy().tobytes())
    if backend is Backend.ARRAY_API_STRICT:
        return bytes(np.from_dlpack(x).tobytes())
    return bytes(np.asarray(x).tobytes())


class RefThreshold:
    """The clip threshold of each step of the ``FACTORIES`` clippers, from the
    float64 references of ``reference.py`` (AutoClip's percentile, ZClip's
    transcription); None where the clipper leaves the gradients alone."""

    def __init__(self, kind: str):
        self.kind = kind
        self.norms: list[float] = []  # AutoClip's history
        warmup = 5 if kind == "zclip_warmup" else 2
        self.zclip = reference.ZClipReference(warmup_steps=warmup)

    def step(self, g: float) -> float | None:
        if self.kind == "global":
            return 1.0
        if self.kind.startswith("autoclip"):
            self.norms.append(g)
            window = self.norms[-2:] if self.kind == "autoclip_window" else self.norms
            return reference.percentile(window, 30)
        return self.zclip.step(g)


FACTORIES = {
    "global": lambda: GlobalNormClipper(1.0),
    "autoclip": lambda: AutoClip(percentile=30),
    "autoclip_window": lambda: AutoClip(percentile=30, history=2),
    "zclip_warmup": lambda: ZClip(warmup_steps=5),
    "zclip": lambda: ZClip(warmup_steps=2),
}


def bad_partner(backend: Backend, g0: Any, how: str) -> Any:
    """A second gradient an in-place call cannot scale together with ``g0``."""
    if how == "shared":  # a view of the first gradient: it would be scaled twice
        return g0[...] if not backend.is_torch else g0.view(g0.shape)
    shape = tuple(g0.shape)
    if backend.is_torch:  # stride 0: one memory location for a whole row
        import torch

        return torch.zeros(shape[-1], dtype=g0.dtype).expand(*shape)
    if backend is Backend.ARRAY_API_STRICT:
        import array_api_strict as xp

        return xp.broadcast_to(xp.zeros(shape[-1], dtype=g0.dtype), shape)
    base = np.zeros(shape[-1], g0.dtype)
    base.flags.writeable = backend.writeable
    return np.lib.stride_tricks.as_strided(
        base, shape, (0, base.itemsize), writeable=backend.writeable
    )


def refusal_message(backend: Backend, how: str) -> str:
    if not backend.writeable:
        return "read-only"
    return {"shared": "share memory", "stride0": "stride 0"}[how]


# ---------------------------------------------------------------------- AGC

RNG = np.random.default_rng(13)
P64 = [RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))]
G64 = [RNG.normal(size=(3, 4)) * 10.0, RNG.normal(size=(3, 4)) * 0.01]  # g0 is clipped


@pytest.mark.parametrize("how", ["shared", "stride0"])
def test_agc_refuses_a_bad_second_gradient_before_any_write(backend: Backend, how: str) -> None:
    agc = AGC(clipping=0.05)
    ps = [backend.asarray(p) for p in P64]
    agc.clip([backend.asarray(g) for g in G64], ps)  # a counted step: state to keep
    g0 = backend.asarray(G64[0])
    gs = [g0, bad_partner(backend, g0, how)]
    before, state = [raw(backend, a) for a in gs + ps], clipper_state(agc)
    with pytest.raises(ValueError, match=refusal_message(backend, how)):
        agc(gs, ps)
    assert [raw(backend, a) for a in gs + ps] == before
    assert clipper_state(agc) == state and agc.step == 1
    # the same call with sound gradients clips as timm does and counts the step
    gs = [backend.asarray(g) for g in G64]
    if backend.writeable:
        agc(gs, ps)
    else:
        gs = agc.clip(gs, ps)[0]
    for got, p, g in zip(gs, P64, G64):
        np.testing.assert_allclose(
            backend.to_numpy(got), reference.timm_agc(p, g, 0.05, 1e-3), rtol=1e-12
        )
    assert agc.step == 2


def test_agc_read_only_second_gradient_is_refused_before_the_first_is_clipped() -> None:
    """The issue's case: NumPy's ValueError came after the first gradient was
    clipped and the step counted."""
    agc = AGC(clipping=0.05)
    gs = [G64[0].copy(), G64[1].copy()]
    gs[1].flags.writeable = False
    ps = [p.copy() for p in P64]
    before, state = [a.tobytes() for a in gs + ps], clipper_state(agc)
    with pytest.raises(ValueError, match="gradient 1 is read-only"):
        agc(gs, ps)
    assert [a.tobytes() for a in gs + ps] == before
    assert clipper_state(agc) == state and agc.step == 0


def test_agc_bad_second_parameter_is_refused_before_any_write(backend: Backend) -> None:
    agc = AGC(clipping=0.05)
    gs = [backend.asarray(g) for g in G64]
    ps = [backend.asarray(P64[0]), backend.asarray(np.ones((4, 3)))]  # wrong shape
    before, state = [raw(backend, a) for a in gs + ps], clipper_state(agc)
    call = agc if backend.writeable else agc.clip  # read-only: the out-of-place twin
    with pytest.raises(ValueError, match="parameter shape"):
        call(gs, ps)
    assert [raw(backend, a) for a in gs + ps] == before
    assert clipper_state(agc) == state


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_agc_interleaved_views_do_not_share_memory_and_are_clipped(lib: str) -> None:
    """``mem[..., 0]`` and ``mem[..., 1]`` overlap as byte ranges but share no
    element: accepted, and each clipped as timm clips it."""
    stacked = np.stack(G64, axis=-1)  # (3, 4, 2): the two gradients interleaved
    if lib == "torch":
        torch = pytest.importorskip("torch")
        mem = torch.tensor(stacked)
        ps = [torch.tensor(p) for p in P64]
    else:
        mem = stacked
        ps = [p.copy() for p in P64]
    gs = [mem[..., 0], mem[..., 1]]
    AGC(clipping=0.05)(gs, ps)
    for got, p, g in zip(gs, P64, G64):
        np.testing.assert_allclose(
            np.asarray(got), reference.timm_agc(p, g, 0.05, 1e-3), rtol=1e-12
        )


def test_agc_clips_torch_gradients_that_require_grad() -> None:
    """A leaf that requires grad refuses ``mul_``; AGC writes its memory as the core does."""
    torch = pytest.importorskip("torch")
    gs = [torch.tensor(g, requires_grad=True) for g in G64]
    AGC(clipping=0.05)(gs, [torch.tensor(p) for p in P64])
    for got, p, g in zip(gs, P64, G64):
        np.testing.assert_allclose(
            got.detach().numpy(), reference.timm_agc(p, g, 0.05, 1e-3), rtol=1e-12
        )


# ---------------------------------------------------- global-norm clippers

WARM = [1.0, 2.0, 1.5]  # global norms of the calls before the refused one


def two_grads(backend: Backend, norm: float) -> tuple[list[Any], list[np.ndarray]]:
    """Gradients of global norm ``norm`` (the first a (2, 3) block, the second zeros)."""
    g0 = np.zeros((2, 3))
    g0[0, :2] = (0.6 * norm, 0.8 * norm)
    data = [g0, np.zeros((2, 3))]
    return [backend.asarray(d) for d in data], data


@pytest.mark.parametrize("kind", list(FACTORIES))
@pytest.mark.parametrize("how", ["shared", "stride0"])
@pytest.mark.parametrize("spike", [False, True], ids=["calm", "spike"])
def test_global_norm_clippers_refuse_before_any_change(
    backend: Backend, kind: str, how: str, spike: bool
) -> None:
    """Refused on steps that clip (the core refuses; the statistics it had updated
    go back) and on steps that do not (the clipper refuses)."""
    clipper, ref = FACTORIES[kind](), RefThreshold(kind)
    for v in WARM:
        clipper.clip(two_grads(backend, v)[0])
        ref.step(v)
    norm = 40.0 if spike else 1.2
    gs, _ = two_grads(backend, norm)
    gs[1] = bad_partner(backend, gs[0], how)
    before, state = [raw(backend, a) for a in gs], clipper_state(clipper)
    with pytest.raises(ValueError, match=refusal_message(backend, how)):
        clipper(gs)
    assert [raw(backend, a) for a in gs] == before
    assert clipper_state(clipper) == state
    # the refused call left no trace: the next sound one follows the papers' formulas
    gs, data = two_grads(backend, norm)
    if backend.writeable:
        total = clipper(gs)
    else:  # read-only arrays: the out-of-place twin, same state update
        gs, total = clipper.clip(gs)
    want = ref.step(norm)
    assert float(total) == pytest.approx(norm, rel=1e-15)
    assert clipper.last_threshold == (pytest.approx(want, rel=1e-13) if want is not None else None)
    coef = 1.0 if want is None else min(1.0, want / (norm + 1e-6))
    for got, d in zip(gs, data):
        np.testing.assert_allclose(backend.to_numpy(got), d * coef, rtol=1e-13)
    assert clipper.step == len(WARM) + 1


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_read_only_second_gradient_rolls_back_the_statistics(kind: str) -> None:
    """NumPy: the core refuses the read-only gradient after the threshold (and, for
    AutoClip, the history) took this step's norm; all of it goes back."""
    clipper, twin, ref = FACTORIES[kind](), FACTORIES[kind](), RefThreshold(kind)
    for v in WARM:
        ref.step(v)
        for c in (clipper, twin):
            c([np.array([0.6 * v, 0.8 * v])])
    for norm in (40.0, 1.2):
        gs = [np.array([0.6 * norm, 0.8 * norm]), np.zeros(2)]
        gs[1].flags.writeable = False
        before, state = [a.tobytes() for a in gs], clipper_state(clipper)
        with pytest.raises(ValueError, match="read-only"):
            clipper(gs)
        assert [a.tobytes() for a in gs] == before
        assert clipper_state(clipper) == state
    for v in (40.0, 1.2, 3.0):
        a, b = [np.array([0.6 * v, 0.8 * v])], [np.array([0.6 * v, 0.8 * v])]
        clipper(a)
        twin(b)
        want = ref.step(v)
        assert clipper.last_threshold == (
            pytest.approx(want, rel=1e-13) if want is not None else None
        )
        coef = 1.0 if want is None else min(1.0, want / (v + 1e-6))
        np.testing.assert_allclose(a[0], [0.6 * v * coef, 0.8 * v * coef], rtol=1e-13)
        np.testing.assert_array_equal(a[0], b[0])
    assert clipper_state(clipper) == clipper_state(twin)


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_nonfinite_error_keeps_the_last_call_attributes(kind: str) -> None:
    clipper = FACTORIES[kind]()
    clipper.nonfinite = "error"
    clipper([np.array([3.0, 4.0])])
    state = clipper_state(clipper)
    g = [np.array([1.0, math.nan])]
    with pytest.raises(fastclip.NonFiniteNormError):
        clipper(g)
    assert clipper_state(clipper) == state and clipper.last_total_norm == 5.0


def test_zclip_zero_variance_with_eps_zero_is_a_spike_not_zero_division() -> None:
    """Equal warm-up norms give sigma = 0; with eps = 0 the z-score of a larger norm
    is +inf (IEEE division, as on a float tensor), a spike clipped to the mean."""
    z = ZClip(warmup_steps=2, eps=0.0)
    for _ in range(2):
        z([np.array([1.0])])
    g = [np.array([5.0])]
    z(g)
    # z = inf: eta = inf, target = mean + 2.5 * 0 / inf = 1; coefficient 1 / (5 + eps)
    assert z.last_threshold == 1.0
    assert g[0][0] == pytest.approx(5.0 * (1.0 / (5.0 + 0.0)), rel=1e-15)
    g = [np.array([1.0])]
    z(g)  # z = 0 / 0 = NaN: not a spike, as in the reference
    assert z.last_threshold is None and g[0][0] == 1.0


# ----------------------------------------------------------- hyperparameters

BAD_HYPERPARAMETERS = [
    (ZClip, "clip_factor", [0.0, -1.0, math.nan, math.inf], ["1.0", True, None, [1.0]]),
    (ZClip, "alpha", [0.0, 1.0, -0.5, math.nan], ["0.9", True, None]),
    (ZClip, "z_thresh", [0.0, -1.0, math.nan, math.inf], ["2.5", True, None]),
    (ZClip, "warmup_steps", [0, -3], [2.0, True, "3", None]),
    (ZClip, "mode", ["median", ""], [1, None, True]),
    (ZClip, "clip_option", ["clip"], [0, None]),
    (ZClip, "skip_update_on_spike", [], ["False", 0, 1, None]),
    (ZClip, "max_norm", [-1.0, math.nan], ["1.0", True]),
    (ZClip, "eps", [-1e-6, math.inf, math.nan], ["1e-6", None]),
    (ZClip, "ord", [0, -2.0, math.nan, "two"], []),
    (ZClip, "nonfinite", ["ignore", "Skip"], [None, 1, True]),
    (AutoClip, "percentile", [-1.0, 100.5, 101, math.nan], ["10", True, None]),
    (AutoClip, "history", [0, -1], [2.0, True, "5"]),
    (AutoClip, "eps", [-1.0, math.inf], ["0"]),
    (GlobalNormClipper, "max_norm", [-1.0, math.nan], ["1", None, True]),
    (GlobalNormClipper, "nonfinite", ["warn", "ignore"], [None]),
    (AGC, "clipping", [0.0, -0.01, math.nan, math.inf], ["0.01", True, None, "a", [0.1]]),
    (AGC, "eps", [-1e-3, math.nan, math.inf], ["1e-3", None]),
    (AGC, "axis", ["nchw", (1, 1), [0, -0, 0]], [1.5, True, None, [1.0], ("1",)]),
]


def _construct(cls: type, name: str, value: Any) -> Any:
    kwargs = {name: value}
    if cls is GlobalNormClipper and name != "max_norm":
        kwargs["max_norm"] = 1.0  # the one required argument
    return cls(**kwargs)


@pytest.mark.parametrize(
    ("cls", "name", "value", "exc"),
    [
        pytest.param(cls, name, v, exc, id=f"{cls.__name__}-{name}-{v!r}")
        for cls, name, bad_values, bad_types in BAD_HYPERPARAMETERS
        for vs, exc in ((bad_values, ValueError), (bad_types, TypeError))
        for v in vs
    ],
)
def test_hyperparameters_are_validated(cls: type, name: str, value: Any, exc: type) -> None:
    with pytest.raises(exc, match=name):
        _construct(cls, name, value)


def test_valid_hyperparameters_are_normalised() -> None:
    z = ZClip(alpha=np.float32(0.5), clip_factor=np.array(0.5), mode="ZScore", clip_option="MEAN")
    assert (z.alpha, z.clip_factor, z.mode, z.clip_option) == (0.5, 0.5, "zscore", "mean")
    assert type(z.alpha) is float and type(z.clip_factor) is float
    assert ZClip(skip_update_on_spike=np.bool_(True)).skip_update_on_spike is True
    assert ZClip(warmup_steps=np.int64(3)).warmup_steps == 3
    assert AutoClip(percentile=np.int32(50), history=np.int16(4)).state_dict()["history"] == 4
    assert AGC(axis=[0, -1]).axis == (0, -1) and AGC(axis=2).axis == (2,)
    assert AGC(clipping=np.float64(0.1)).clipping == 0.1
