"""fastclip.adaptive against plain float64 transcriptions of the papers' reference code.

This file owns GlobalNormClipper, AutoClip and ZClip and the clippers' shared interface
(policies, state dict and pickle round trips, public paths); AGC is in test_agc.py,
refusals in test_safety_adaptive.py, refused and loaded states in test_adaptive_state.py.
"""

from __future__ import annotations

import copy
import io
import json
import math
import pickle

import numpy as np
import pytest
import reference
from hypothesis import given
from hypothesis import strategies as st

import fastclip
from fastclip.adaptive import AGC, AutoClip, GlobalNormClipper, ZClip, _Percentile


def norm_sequence(rng: np.random.Generator, n: int, spikes: float = 0.03) -> list[float]:
    """Log-normal norms drifting down, with spikes and repeated values."""
    base = np.exp(rng.normal(0, 0.2, n)) * np.linspace(3, 1, n)
    spike = rng.random(n) < spikes
    base[spike] *= rng.uniform(5, 50, spike.sum())
    base[rng.random(n) < 0.05] = 1.0  # ties
    return [float(x) for x in base]


def one(norm: float) -> list[np.ndarray]:
    """A gradient list whose global norm is exactly ``norm`` (float64, one element)."""
    return [np.array([norm], np.float64)]


# ------------------------------------------------------------------ AutoClip


@pytest.mark.parametrize("p", [0, 10, 37.5, 50, 90, 100])
@pytest.mark.parametrize("window", [None, 1, 7, 200])
def test_percentile_structure_equals_numpy(p: float, window: int | None) -> None:
    rng = np.random.default_rng(int(p * 10) + (window or 0))
    values = norm_sequence(rng, 3000)
    stats = _Percentile(p / 100)
    hist: list[float] = []
    for i, v in enumerate(values):
        stats.add(v, i)
        hist.append(v)
        if window is not None and len(hist) > window:
            stats.remove(i - window)
            hist.pop(0)
        assert stats.value() == reference.percentile(hist, p)


@given(
    st.lists(
        st.one_of(
            st.floats(0, 1e6, allow_nan=False),
            st.sampled_from([0.0, 1.0, math.inf, math.nan]),
        ),
        min_size=1,
        max_size=60,
    ),
    st.floats(0, 100),
    st.one_of(st.none(), st.integers(1, 10)),
)
def test_percentile_property(values: list[float], p: float, window: int | None) -> None:
    stats = _Percentile(p / 100)
    hist: list[float] = []
    for i, v in enumerate(values):
        stats.add(v, i)
        hist.append(v)
        if window is not None and len(hist) > window:
            stats.remove(i - window)
            hist.pop(0)
        got, want = stats.value(), reference.percentile(hist, p)
        assert got == want or (math.isnan(got) and math.isnan(want))


@pytest.mark.parametrize("history", [None, 50])
def test_autoclip_against_reference(history: int | None) -> None:
    rng = np.random.default_rng(3)
    norms = norm_sequence(rng, 600)
    clipper = AutoClip(percentile=10, history=history)
    hist: list[float] = []
    for v in norms:
        g = [np.full(4, v / 2.0), np.zeros(3)]  # global norm exactly v
        before = [a.copy() for a in g]
        total = clipper(g)
        hist.append(v)
        if history is not None:
            hist = hist[-history:]
        thr = reference.percentile(hist, 10)
        assert float(total) == pytest.approx(v, rel=1e-15)
        assert clipper.last_threshold == thr
        coef = min(1.0, thr / (float(total) + 1e-6))
        np.testing.assert_allclose(g[0], before[0] * coef, rtol=1e-15)


def test_autoclip_clips_spikes_and_matches_torch_reference() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    clipper = AutoClip(percentile=25)
    grad_history: list[float] = []
    for _ in range(40):
        scale = 100.0 if rng.random() < 0.2 else 1.0
        data = [rng.normal(size=(5, 3)) * scale, rng.normal(size=3) * scale]
        ours = [torch.tensor(d, dtype=torch.float32) for d in data]
        ref = [torch.nn.Parameter(torch.zeros(d.shape)) for d in data]
        for r, d in zip(ref, data):
            r.grad = torch.tensor(d, dtype=torch.float32)
        # the AutoClip paper's code, verbatim in spirit
        obs = sum(float(r.grad.norm(2)) ** 2 for r in ref) ** 0.5
        grad_history.append(obs)
        torch.nn.utils.clip_grad_norm_(ref, float(np.percentile(grad_history, 25)))
        clipper(ours)
        for a, r in zip(ours, ref):
            torch.testing.assert_close(a, r.grad, rtol=2e-6, atol=1e-7)


# --------------------------------------------------------------------- ZClip

ZCONFIGS = [
    dict(),
    dict(mode="percentile"),
    dict(clip_option="mean"),
    dict(max_norm=2.0),
    dict(alpha=0.9, z_thresh=1.5, warmup_steps=5, clip_factor=0.8),
    dict(skip_update_on_spike=True, warmup_steps=3),
]


def _ref_kwargs(cfg: dict) -> dict:
    out = dict(cfg)
    if "max_norm" in out:
        out["max_grad_norm"] = out.pop("max_norm")
    return out


@pytest.mark.parametrize("cfg", ZCONFIGS, ids=str)
def test_zclip_against_reference(cfg: dict) -> None:
    rng = np.random.default_rng(len(str(cfg)))
    norms = norm_sequence(rng, 1500, spikes=0.05)
    ours, ref = ZClip(**cfg), reference.ZClipReference(**_ref_kwargs(cfg))
    for step, v in enumerate(norms):
        g = one(v)
        total = ours(g)
        want = ref.step(v)
        assert float(total) == v
        assert ours.last_threshold == want
        expected = v if want is None else v * min(1.0, want / (v + 1e-6))
        assert g[0][0] == pytest.approx(expected, rel=1e-14)
        if step == 700:  # a state_dict round trip mid-run, through JSON
            ours2 = ZClip()
            ours2.load_state_dict(json.loads(json.dumps(ours.state_dict())))
            ours = ours2
        if ref.initialized:
            assert ours.mean == ref.mean and ours.var == ref.var


def test_zclip_spike_is_clipped_and_stats_use_clipped_norm() -> None:
    z = ZClip(warmup_steps=4)
    for v in (1.0, 1.1, 0.9, 1.0):
        z(one(v))
    mean, var = z.mean, z.var
    g = one(100.0)
    z(g)
    std = math.sqrt(var)
    zscore = (100.0 - mean) / (std + 1e-6)
    target = mean + 2.5 * std / (zscore / 2.5)
    assert g[0][0] == pytest.approx(100.0 * target / (100.0 + 1e-6), rel=1e-13)
    new_mean = 0.97 * mean + 0.03 * target
    assert z.mean == pytest.approx(new_mean, rel=1e-15)
    assert z.var == pytest.approx(0.97 * var + 0.03 * (target - new_mean) ** 2, rel=1e-15)


# ------------------------------------------------------- non-finite policies


def _clippers() -> list:
    return [
        GlobalNormClipper(1.0),
        AutoClip(percentile=30),
        AutoClip(percentile=30, history=5),
        ZClip(warmup_steps=3),
    ]


@pytest.mark.parametrize("idx", range(4))
def test_nonfinite_skip_keeps_state_and_grads(idx: int) -> None:
    rng = np.random.default_rng(idx)
    norms = norm_sequence(rng, 40)
    bad_at = {5, 17, 30}
    skipping = _clippers()[idx]
    skipping.nonfinite = "skip"
    clean = _clippers()[idx]
    for i, v in enumerate(norms):
        if i in bad_at:
            g = [np.array([v, math.nan if i != 17 else math.inf])]
            before = g[0].copy()
            total = skipping(g)
            assert skipping.last_step_skipped
            assert not math.isfinite(float(total))
            np.testing.assert_array_equal(g[0], before)
            continue
        ga, gb = one(v), one(v)
        skipping(ga)
        clean(gb)
        assert not skipping.last_step_skipped
        np.testing.assert_array_equal(ga[0], gb[0])
        assert skipping.state_dict() == clean.state_dict() | {"nonfinite": "skip"}


@pytest.mark.parametrize("idx", range(4))
def test_nonfinite_error_raises_before_anything(idx: int) -> None:
    c = _clippers()[idx]
    c.nonfinite = "error"
    for v in (1.0, 2.0, 1.5, 1.2):
        c(one(v))
    state = c.state_dict()
    g = [np.array([1.0, math.nan])]
    with pytest.raises(fastclip.NonFiniteNormError):
        c(g)
    assert np.isnan(g[0][1]) and g[0][0] == 1.0
    assert c.state_dict() == state


def test_nonfinite_propagate_matches_references() -> None:
    # AutoClip: NaN enters the history, so every later threshold is NaN (np.percentile)
    a = AutoClip(percentile=50)
    a(one(1.0))
    a([np.array([math.nan])])
    g = one(2.0)
    a(g)
    assert math.isnan(a.last_threshold) and math.isnan(g[0][0])
    # ZClip: NaN poisons the mean as in the reference
    z, ref = ZClip(warmup_steps=2), reference.ZClipReference(warmup_steps=2)
    for v in (1.0, 1.2, math.nan, 1.0):
        z(one(v))
        ref.step(v)
    assert math.isnan(z.mean) and math.isnan(ref.mean)
    # GlobalNormClipper: torch semantics, NaN coefficient
    g = [np.array([1.0, math.nan]), np.array([2.0])]
    GlobalNormClipper(1.0)(g)
    assert np.isnan(g[1][0])


# ------------------------------------------------------- interface, state


@pytest.mark.parametrize("idx", range(4))
def test_out_of_place_twin(idx: int) -> None:
    rng = np.random.default_rng(10 + idx)
    a, b = _clippers()[idx], _clippers()[idx]
    for v in norm_sequence(rng, 30, spikes=0.2):
        g = [np.array([v * 0.6, v * 0.8], np.float32)]
        keep = g[0].copy()
        new, total_b = b.clip(g)
        np.testing.assert_array_equal(g[0], keep)
        total_a = a(g)
        assert float(total_a) == float(total_b)
        np.testing.assert_array_equal(new[0], g[0])
        assert new[0] is not g[0]


@pytest.mark.parametrize("idx", range(4))
@pytest.mark.parametrize("how", ["pickle", "json", "torch", "deepcopy"])
def test_state_dict_round_trip(idx: int, how: str) -> None:
    rng = np.random.default_rng(idx)
    norms = norm_sequence(rng, 80, spikes=0.1)
    a = _clippers()[idx]
    for v in norms[:50]:
        a(one(v))
    sd = a.state_dict()
    if how == "pickle":
        sd = pickle.loads(pickle.dumps(sd))
    elif how == "json":
        sd = json.loads(json.dumps(sd))
    elif how == "torch":
        torch = pytest.importorskip("torch")
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    else:
        sd = copy.deepcopy(sd)
    b = type(a).__new__(type(a))
    b.load_state_dict(sd)
    assert b.state_dict() == a.state_dict()
    for v in norms[50:]:
        ga, gb = one(v), one(v)
        assert float(a(ga)) == float(b(gb))
        assert a.last_threshold == b.last_threshold
        np.testing.assert_array_equal(ga[0], gb[0])


def test_global_norm_clipper_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    data = [rng.normal(size=(7, 5)), rng.normal(size=11)]
    ours = [torch.tensor(d, dtype=torch.float32) for d in data]
    ref = [torch.nn.Parameter(torch.zeros(d.shape)) for d in data]
    for r, d in zip(ref, data):
        r.grad = torch.tensor(d, dtype=torch.float32)
    t_ref = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    t_ours = GlobalNormClipper(0.5)(ours)
    torch.testing.assert_close(t_ours, t_ref, rtol=1e-6, atol=0)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r.grad, rtol=1e-6, atol=1e-8)


def test_array_api_strict_route() -> None:
    xp = pytest.importorskip("array_api_strict")
    g = [xp.asarray([3.0, 4.0]), xp.asarray([0.0])]
    total = GlobalNormClipper(1.0, eps=0.0)(g)
    assert float(total) == 5.0
    assert float(g[0][0]) == pytest.approx(0.6)
    new, _ = AGC(clipping=0.1).clip([xp.asarray([[3.0, 4.0]])], [xp.asarray([[1.0, 0.0]])])
    assert float(new[0][0, 0]) == pytest.approx(0.06)


def test_load_state_dict_is_strict_and_leaves_the_clipper_unchanged_on_failure() -> None:
    """Wrong keys (another class's state, a missing or an extra key) or a bad value
    raise; the clipper keeps its configuration and statistics."""
    z = ZClip(warmup_steps=2)
    for n in (1.0, 1.2, 0.9):
        z([np.array([n], np.float32)])
    before = z.state_dict()
    bad_states = [
        AutoClip().state_dict(),  # another clipper's
        {k: v for k, v in before.items() if k != "buffer"},  # a missing key
        {**before, "extra": 1},  # an unexpected key
        {**before, "alpha": 2.0},  # a value the constructor refuses
    ]
    for bad in bad_states:
        with pytest.raises(ValueError):
            z.load_state_dict(bad)
        assert z.state_dict() == before
    clone = ZClip()
    clone.load_state_dict(before)
    assert clone.state_dict() == before


# ------------------------------------------------- public path and pickles

# Pickles (protocol 4) written by fastclip.adaptive when it was one module:
# AutoClip(percentile=50, history=3) after the norms 1, 4, 2, 8 and
# ZClip(warmup_steps=2) after the norms 1, 3, 2.
OLD_AUTOCLIP = (
    "gASV5QEAAAAAAACMEWZhc3RjbGlwLmFkYXB0aXZllIwIQXV0b0NsaXCUk5QpgZR9lCiMB2hpc3RvcnmUSwOMCnBlcmNl"
    "bnRpbGWUR0BJAAAAAAAAjANvcmSUR0AAAAAAAAAAjANlcHOURz6wxvegte2NjAlub25maW5pdGWUjAlwcm9wYWdhdGWU"
    "jARzdGVwlEsEjA9sYXN0X3RvdGFsX25vcm2UR0AgAAAAAAAAjA5sYXN0X3RocmVzaG9sZJRHQBAAAAAAAACMEWxhc3Rf"
    "c3RlcF9za2lwcGVklImMBl9zdGF0c5RoAIwLX1BlcmNlbnRpbGWUk5QpgZR9lCiMAXGURz/gAAAAAAAAjAJsb5RdlChH"
    "wBAAAAAAAABLAYaUR7/wAAAAAAAASwCGlEfAAAAAAAAAAEsChpRljAJoaZRdlEdAIAAAAAAAAEsDhpRhjAV3aGVyZZR9"
    "lChLAUsASwJLAEsDSwF1jARuX2xvlEsCjARuX2hplEsBjARuYW5zlEsAjARkZWFklI+UKEsAkHVijAZfbm9ybXOUjAtj"
    "b2xsZWN0aW9uc5SMBWRlcXVllJOUKVKUKEsBR0AQAAAAAAAAhpRLAkdAAAAAAAAAAIaUSwNHQCAAAAAAAACGlGWMCV9u"
    "ZXh0X2tleZRLBHViLg=="
)
OLD_ZCLIP = (
    "gASVgwEAAAAAAACMEWZhc3RjbGlwLmFkYXB0aXZllIwFWkNsaXCUk5QpgZR9lCiMBWFscGhhlEc/7wo9cKPXCowIel90"
    "aHJlc2iUR0AEAAAAAAAAjAx3YXJtdXBfc3RlcHOUSwKMBG1vZGWUjAZ6c2NvcmWUjAhtYXhfbm9ybZROjAtjbGlwX29w"
    "dGlvbpSMEGFkYXB0aXZlX3NjYWxpbmeUjAtjbGlwX2ZhY3RvcpRHP/AAAAAAAACMA2Vwc5RHPrDG96C17Y2MFHNraXBf"
    "dXBkYXRlX29uX3NwaWtllImMA29yZJRHQAAAAAAAAACMCW5vbmZpbml0ZZSMCXByb3BhZ2F0ZZSMBHN0ZXCUSwOMD2xh"
    "c3RfdG90YWxfbm9ybZRHQAAAAAAAAACMDmxhc3RfdGhyZXNob2xklE6MEWxhc3Rfc3RlcF9za2lwcGVklImMBG1lYW6U"
    "R0AAAAAAAAAAjAN2YXKURz/vCj1wo9cKjAtpbml0aWFsaXplZJSIjAZidWZmZXKUXZR1Yi4="
)


def _ran_clippers() -> list:
    """Every public clipper, each after a few steps (so with statistics to pickle)."""
    rng = np.random.default_rng(7)
    out = []
    for c in [*_clippers(), AGC(clipping=0.05)]:
        for v in norm_sequence(rng, 12, spikes=0.2):
            g = one(v)
            c(g, [np.ones_like(g[0])]) if isinstance(c, AGC) else c(g)
        out.append(c)
    return out


def _pickled_modules(data: bytes) -> set[str]:
    """The modules a pickle's classes are looked up in."""
    modules = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            modules.add(module)
            return super().find_class(module, name)

    Recording(io.BytesIO(data)).load()
    return modules


@pytest.mark.parametrize("cls", [GlobalNormClipper, AutoClip, ZClip, AGC])
def test_public_classes_live_at_fastclip_adaptive(cls: type) -> None:
    assert cls.__module__ == "fastclip.adaptive"
    assert getattr(fastclip.adaptive, cls.__name__) is cls is getattr(fastclip, cls.__name__)
    assert cls.__name__ in fastclip.adaptive.__all__
    assert repr(cls) == f"<class 'fastclip.adaptive.{cls.__name__}'>"
    assert cls.__doc__ and "References" in cls.__doc__ and "https://arxiv.org/abs/" in cls.__doc__


@pytest.mark.parametrize("idx", range(5))
def test_pickled_clipper_round_trips_with_its_state(idx: int) -> None:
    a = _ran_clippers()[idx]
    data = pickle.dumps(a, protocol=4)
    assert _pickled_modules(data) <= {"fastclip.adaptive", "collections"}
    b = pickle.loads(data)
    assert type(b) is type(a) and repr(b) == repr(a)
    assert repr(a).startswith(type(a).__name__ + "(")
    assert b.state_dict() == a.state_dict()
    for name in ("step", "last_total_norm", "last_threshold", "last_step_skipped"):
        assert getattr(b, name) == getattr(a, name)
    # the restored statistics carry on as the original's
    rng = np.random.default_rng(idx)
    for v in norm_sequence(rng, 20, spikes=0.2):
        ga, gb = one(v), one(v)
        if isinstance(a, AGC):
            pa = [np.ones_like(ga[0])]
            assert float(a(ga, pa)) == float(b(gb, pa))
        else:
            assert float(a(ga)) == float(b(gb))
        assert a.last_threshold == b.last_threshold
        np.testing.assert_array_equal(ga[0], gb[0])
    assert b.state_dict() == a.state_dict()


def test_pickles_of_the_single_module_still_load() -> None:
    import base64

    auto = pickle.loads(base64.b64decode(OLD_AUTOCLIP))
    fresh = AutoClip(percentile=50, history=3)
    for v in (1.0, 4.0, 2.0, 8.0):
        fresh(one(v))
    assert type(auto) is AutoClip and auto.state_dict() == fresh.state_dict()
    z = pickle.loads(base64.b64decode(OLD_ZCLIP))
    zfresh = ZClip(warmup_steps=2)
    for v in (1.0, 3.0, 2.0):
        zfresh(one(v))
    assert type(z) is ZClip and z.state_dict() == zfresh.state_dict()
    for v in (0.5, 30.0, 2.5, 1.0):
        for old, new in ((auto, fresh), (z, zfresh)):
            go, gn = one(v), one(v)
            assert float(old(go)) == float(new(gn))
            assert old.last_threshold == new.last_threshold
            np.testing.assert_array_equal(go[0], gn[0])
