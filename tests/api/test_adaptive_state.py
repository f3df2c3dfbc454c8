"""The state dicts of fastclip.adaptive's clippers: what ``load_state_dict`` refuses
(wrong types, inconsistent statistics, garbage from hypothesis) and leaves
unchanged, and that an accepted state continues exactly as the clipper it came
from, through JSON and ``torch.save``, with the thresholds the papers' formulas
give (float64 references of ``tests/reference.py``).

The clippers' values and their pickle round trips are in ``test_adaptive.py``
and ``test_agc.py``; refusals of calls and constructor arguments in
``test_safety_adaptive.py``.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pytest
from _backends import clipper_state
from hypothesis import event, given
from hypothesis import strategies as st

import fastclip
from fastclip.adaptive import AGC, AutoClip, GlobalNormClipper, ZClip


def _run(clipper: Any, norms: list[float], split: bool = True) -> None:
    """Calls whose gradients have these global norms: split over two elements, or
    (``split=False``) one nonzero element, whose p-norm is the value itself for
    every p (a tiny p would make a split norm's power sum overflow, 2**(1/p) * v)."""
    for v in norms:
        g = [0.6 * v, 0.8 * v] if split else [v, 0.0]
        if isinstance(clipper, AGC):
            clipper([np.array([g])], [np.array([[1.0, 1.0]])])
        else:
            clipper([np.array(g)])


STATEFUL = {
    "global": lambda: GlobalNormClipper(1.0),
    "autoclip": lambda: AutoClip(percentile=30),
    "autoclip_window": lambda: AutoClip(percentile=30, history=2),
    "zclip": lambda: ZClip(warmup_steps=3),
    "agc": lambda: AGC(clipping=0.1, axis=(1,)),
}


def _ran(kind: str) -> Any:
    """A clipper of STATEFUL after five calls (a window full, ZClip past its warm-up)."""
    c = STATEFUL[kind]()
    _run(c, [1.0, 1.5, 2.0, 1.2, 9.0])
    return c


def _zclip(steps: int) -> ZClip:
    z = ZClip(warmup_steps=3)
    _run(z, [1.0, 1.5, 2.0, 1.2, 9.0][:steps])
    return z


BAD_STATES = [
    # the cases
    (lambda: _zclip(1), {"initialized": "False"}, TypeError, "initialized"),
    (lambda: _zclip(0), {"buffer": "123", "step": 3}, TypeError, "buffer"),
    (lambda: _zclip(4), {"step": math.inf}, TypeError, "step"),
    (lambda: _zclip(4), {"initialized": True, "mean": None}, ValueError, "mean and var"),
    # types
    (lambda: _zclip(4), {"step": True}, TypeError, "step"),
    (lambda: _zclip(4), {"step": 4.0}, TypeError, "step"),
    (lambda: _zclip(4), {"step": "4"}, TypeError, "step"),
    (lambda: _zclip(4), {"step": -1}, ValueError, "step"),
    (lambda: _zclip(4), {"mean": "1.0"}, TypeError, "mean"),
    (lambda: _zclip(4), {"var": [0.1]}, TypeError, "var"),
    (lambda: _zclip(1), {"buffer": [True]}, TypeError, "buffer"),
    (lambda: _zclip(1), {"buffer": ["1.0"]}, TypeError, "buffer"),
    (lambda: _zclip(1), {"buffer": {1.0: 1}}, TypeError, "buffer"),
    (lambda: _zclip(4), {"skip_update_on_spike": "False"}, TypeError, "skip_update_on_spike"),
    (lambda: _zclip(4), {"alpha": np.array(0.5)}, TypeError, "alpha"),
    # ranges
    (lambda: _zclip(4), {"var": -0.5}, ValueError, "var"),
    (lambda: _zclip(4), {"mean": -math.inf}, ValueError, "mean"),
    (lambda: _zclip(1), {"buffer": [-1.0]}, ValueError, "buffer"),
    (lambda: _zclip(4), {"clip_factor": 0.0}, ValueError, "clip_factor"),
    # consistency
    (lambda: _zclip(1), {"step": 2}, ValueError, "warm-up norms"),
    (lambda: _zclip(2), {"buffer": [1.0, 2.0, 3.0], "step": 3}, ValueError, "warm-up norms"),
    (lambda: _zclip(1), {"mean": 1.0, "var": 0.0}, ValueError, "before the warm-up"),
    (lambda: _zclip(4), {"buffer": [1.0]}, ValueError, "non-empty warm-up buffer"),
    (lambda: _zclip(4), {"step": 2}, ValueError, "warmup_steps"),
    (lambda: _zclip(4), {"warmup_steps": 9}, ValueError, "warmup_steps"),
    (lambda: _ran("autoclip"), {"norms": [1.0]}, ValueError, "norms"),
    (lambda: _ran("autoclip"), {"norms": "12345"}, TypeError, "norms"),
    (lambda: _ran("autoclip"), {"norms": [1.0, 2.0, None, 4.0, 5.0]}, TypeError, "norms"),
    (lambda: _ran("autoclip"), {"norms": [1.0, 2.0, -3.0, 4.0, 5.0]}, ValueError, "norms"),
    (lambda: _ran("autoclip_window"), {"history": 3}, ValueError, "history"),
    (lambda: _ran("autoclip_window"), {"history": 2.0}, TypeError, "history"),
    (lambda: _ran("autoclip"), {"percentile": "30"}, TypeError, "percentile"),
    (lambda: _ran("global"), {"step": 1.5}, TypeError, "step"),
    (lambda: _ran("global"), {"max_norm": None}, TypeError, "max_norm"),
    (lambda: _ran("global"), {"ord": "two"}, ValueError, "ord"),
    (lambda: _ran("global"), {"nonfinite": ["skip"]}, TypeError, "nonfinite"),
    (lambda: _ran("agc"), {"axis": "[1]"}, ValueError, "axis"),
    (lambda: _ran("agc"), {"axis": [1.0]}, TypeError, "axis"),
    (lambda: _ran("agc"), {"clipping": -1.0}, ValueError, "clipping"),
    (lambda: _ran("agc"), {"step": None}, TypeError, "step"),
    (lambda: _ran("global"), {"max_norm": 10**400}, ValueError, "max_norm"),
    (lambda: _ran("autoclip"), {"percentile": 10**400}, ValueError, "percentile"),
    (lambda: _zclip(4), {"mean": -(10**400)}, ValueError, "mean"),
]


@pytest.mark.parametrize(("factory", "change", "exc", "match"), BAD_STATES)
def test_bad_states_are_refused_and_leave_the_clipper_unchanged(
    factory: Any, change: dict, exc: type, match: str
) -> None:
    clipper, twin = factory(), factory()
    state = clipper_state(clipper)
    with pytest.raises(exc, match=match):
        clipper.load_state_dict({**clipper.state_dict(), **change})
    assert clipper_state(clipper) == state
    _run(clipper, [1.1, 30.0, 0.9])
    _run(twin, [1.1, 30.0, 0.9])
    assert clipper_state(clipper) == clipper_state(twin)


@pytest.mark.parametrize("bad", [[("step", 1)], "state", None, 3])
def test_a_state_dict_must_be_a_mapping(bad: Any) -> None:
    z = _zclip(2)
    state = clipper_state(z)
    with pytest.raises(TypeError, match="needs a dict"):
        z.load_state_dict(bad)
    assert clipper_state(z) == state


def test_keys_of_any_type_are_named_not_a_crash() -> None:
    g = GlobalNormClipper(1.0)
    with pytest.raises(ValueError, match="unexpected keys"):
        g.load_state_dict({**g.state_dict(), 1: 2, (3,): 4})


@pytest.mark.parametrize("kind", [*STATEFUL, "zclip_warmup"])
@pytest.mark.parametrize("how", ["json", "torch"])
def test_state_dict_round_trip_continues_identically(kind: str, how: str) -> None:
    a = _zclip(2) if kind == "zclip_warmup" else _ran(kind)
    sd = a.state_dict()
    if how == "json":
        sd = json.loads(json.dumps(sd))
    else:
        torch = pytest.importorskip("torch")
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    b = type(a).__new__(type(a))
    b.load_state_dict(sd)
    assert b.state_dict() == a.state_dict()
    _run(a, [1.1, 30.0, 0.9, 2.0])
    _run(b, [1.1, 30.0, 0.9, 2.0])
    assert clipper_state(a) == clipper_state(b)


def test_loaded_statistics_drive_the_next_threshold_as_the_formulas_say() -> None:
    """A hand-written (consistent) ZClip state: mean 1, var 0.04, past the warm-up."""
    z = ZClip(warmup_steps=3)
    z.load_state_dict({**z.state_dict(), "step": 7, "initialized": True, "mean": 1.0, "var": 0.04})
    g = [np.array([3.0])]
    z(g)
    zscore = (3.0 - 1.0) / (0.2 + 1e-6)
    target = 1.0 + 2.5 * 0.2 / (zscore / 2.5)
    assert z.last_threshold == pytest.approx(target, rel=1e-15)
    assert g[0][0] == pytest.approx(3.0 * target / (3.0 + 1e-6), rel=1e-15)
    mean = 0.97 + 0.03 * target
    assert z.mean == pytest.approx(mean, rel=1e-15)
    assert z.var == pytest.approx(0.97 * 0.04 + 0.03 * (target - mean) ** 2, rel=1e-15)
    a = AutoClip(percentile=50, history=3)
    a.load_state_dict({**a.state_dict(), "step": 10, "norms": [4.0, 1.0, 2.0]})
    a([np.array([3.0])])  # window [1, 2, 3]: the 4 leaves
    assert a.last_threshold == float(np.percentile([1.0, 2.0, 3.0], 50))


# Anything a JSON or pickle checkpoint could hold, sound or not.
GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.integers(-(2**70), 2**70),
    st.sampled_from([10**400, -(10**400)]),  # beyond the float range: float() raises
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "inf", "zscore", "mean", "skip", "False", "123", "torch"]),
    st.lists(
        st.one_of(st.floats(-1, 1e3), st.integers(-1, 5), st.booleans(), st.text(max_size=2)),
        max_size=6,
    ),
    st.lists(st.floats(0, 10), max_size=6),  # a sound buffer or history, maybe too long
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@given(kind=st.sampled_from(list(STATEFUL)), steps=st.integers(0, 6), data=st.data())
def test_garbage_states_are_refused_or_round_trip_and_run(
    kind: str, steps: int, data: st.DataObject
) -> None:
    norms = [1.0, 1.5, 2.0, 1.2, 9.0, 0.7]
    clipper = STATEFUL[kind]()
    _run(clipper, norms[:steps])
    sd = clipper.state_dict()
    # Sound values of each key, from the same clipper after other numbers of calls:
    # mixed with the rest of this state they are often inconsistent (a buffer too
    # long for the step count), sometimes a valid state of their own.
    pool: dict[str, list[Any]] = {}
    for n in range(len(norms) + 1):
        other = STATEFUL[kind]()
        _run(other, norms[:n])
        for key, value in other.state_dict().items():
            pool.setdefault(key, []).append(value)
    keys = data.draw(st.lists(st.sampled_from(sorted(sd)), min_size=1, max_size=3, unique=True))
    changes = {k: data.draw(st.one_of(st.sampled_from(pool[k]), GARBAGE), k) for k in keys}
    state = clipper_state(clipper)
    try:
        clipper.load_state_dict({**sd, **changes})
    except (TypeError, ValueError) as exc:
        event(f"refused: {type(exc).__name__}")
        assert clipper_state(clipper) == state
        return
    event("accepted")
    # accepted: it round-trips through JSON and the next calls run (no late
    # AssertionError, OverflowError or ZeroDivisionError)
    sd = clipper.state_dict()
    other = type(clipper).__new__(type(clipper))
    other.load_state_dict(json.loads(json.dumps(sd)))
    assert json.dumps(other.state_dict(), sort_keys=True) == json.dumps(sd, sort_keys=True)
    for c in (clipper, other):
        state = clipper_state(c)
        try:
            _run(c, [1.0, 50.0, 1e200, 0.5], split=False)
        except fastclip.NonFiniteNormError:
            assert c.nonfinite == "error"
        except np.exceptions.AxisError:
            # explicit AGC axes are checked against each array's rank at the call, as
            # the core's norm checks them; the refused call changed nothing
            assert kind == "agc" and "axis" in changes and clipper_state(c) == state
            return
    assert clipper_state(clipper) == clipper_state(other)
