"""Refusals of fastclip.distributed's in-place calls are collective (issue 13, data safety).

This file owns the collective refusals of fastclip.distributed; its values are in
test_distributed.py.

When one rank passes a read-only, expanded (stride 0) or overlapping array,
every rank must refuse together, with nothing modified anywhere: were the
refusing rank alone to raise while the others clip, the replicas of one
model would diverge.  One spawned 2-rank gloo group (127.0.0.1,
GLOO_SOCKET_IFNAME=lo, a free port, 60 s collective timeout) runs every
scenario of ``_dist_workers.run_safety_suite``; each rank records what it
raised, whether every byte behind its arrays is unchanged, and the result
of a good call made afterwards, checked here against float64 NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import _dist_workers as W  # noqa: E402

WORLD = 2
_CACHE: list[list[dict[str, Any]]] = []

#: What the refusing rank raises, and a phrase of its message.
EXPECTED = {
    "readonly-numpy": "read-only array",
    "stride0-numpy": "elements share memory (stride 0",
    "overlap-numpy": "arrays 0 and 1 of this in-place call share memory",
    "twice-numpy": "arrays 0 and 3 of this in-place call share memory",
    "readonly-replicated-numpy": "read-only array",
    "expanded-torch": "elements share memory (stride 0",
    "overlap-torch": "arrays 0 and 1 of this in-place call share memory",
    "expanded-rank0-torch": "elements share memory (stride 0",
    "both-torch": "elements share memory (stride 0",
}
CASES = [
    (kind, via)
    for kind, (lib, _) in W.REFUSALS.items()
    for via in ("strictTrue", "strictFalse", *(("grad",) if lib == "torch" else ()))
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not _CACHE:
        _CACHE.append(W.spawn_and_collect(W.run_safety_suite, WORLD, tmp_path_factory.mktemp))
    for res in _CACHE[0]:
        assert "__crash__" not in res, res.get("__crash__")
    return _CACHE[0]


def _reference_clip(lib: str, rank: int) -> tuple[float, list[np.ndarray]]:
    """float64 NumPy: the global norm of the full set and this rank's clipped arrays."""
    sharded, replicated = W.global_set(np.float32)
    full = np.concatenate([a.astype(np.float64) for a in sharded + replicated])
    norm = float(np.linalg.norm(full))
    coef = min(1.0, W.REFUSAL_MAX_NORM / (norm + 1e-6))
    local = W.shards(sharded, WORLD, rank) + replicated
    return norm, [a.astype(np.float64) * coef for a in local]


def test_every_scenario_ran(results: list[dict[str, Any]]) -> None:
    for r, res in enumerate(results):
        assert sorted(res) == sorted(f"{k}-{v}" for k, v in CASES), r


@pytest.mark.parametrize(("kind", "via"), CASES, ids=[f"{k}-{v}" for k, v in CASES])
def test_refusal_is_collective_and_writes_nothing(
    results: list[dict[str, Any]], kind: str, via: str
) -> None:
    lib, culprits = W.REFUSALS[kind]
    phrase = EXPECTED[kind]
    for r in range(WORLD):
        out = results[r][f"{kind}-{via}"]
        assert "error" not in out, (r, out)  # the scenario itself ran to its end
        assert out["unchanged"], f"rank {r} modified its arrays: {out}"
        if r in culprits:
            assert out["raised"] == "ValueError", (r, out)
            assert phrase in out["message"], (r, out["message"])
            assert "rank(s)" not in out["message"]  # its own error, not the group's
        else:
            assert out["raised"] == "ValueError", (r, out)
            msg = out["message"]
            assert f"rank(s) {list(culprits)} of the group rejected their input" in msg, msg
            assert "nothing was modified on any rank" in msg, msg
            for c in culprits:  # the culprit's reason travelled in the one gather
                assert f"rank {c}: ValueError: " in msg, msg
            assert phrase in msg, msg
        # The group is still usable and a good call clips like float64 NumPy.
        norm, ref = _reference_clip(lib, r)
        assert out["after_norm"] == pytest.approx(norm, rel=1e-6)
        assert len(out["after_arrays"]) == len(ref)
        for got, want in zip(out["after_arrays"], ref):
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)


def test_long_reason_is_cut_on_a_character_boundary() -> None:
    """A reason longer than the row's text columns arrives cut, marked, still valid UTF-8."""
    from fastclip.distributed import _reduce as fcd

    error = ValueError("é" * 400)
    text = fcd._reason_bytes(error)
    assert len(text) <= fcd._REASON_BYTES
    row = np.zeros(fcd._WIDTH, np.float64)
    row.view(np.uint8)[fcd._REASON * 8 : fcd._REASON * 8 + len(text)] = np.frombuffer(
        text, np.uint8
    )
    got = fcd._reason_of(row)
    assert got.startswith("ValueError: éé")
    assert got.endswith("...") or len(text) < fcd._REASON_BYTES
    assert got.rstrip(".") == text.decode("utf-8")
    short = fcd._reason_bytes(TypeError("bad"))
    assert short == b"TypeError: bad"
