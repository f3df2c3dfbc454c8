"""fastclip.distributed on real multi-process gloo groups (issue 6, part 2).

This file owns fastclip.distributed's values across ranks; its collective refusals are
in test_safety_distributed.py, the single-process operations in tests/api/.

One spawn per world size (2 and 4 ranks, 127.0.0.1, GLOO_SOCKET_IFNAME=lo,
a free port, 60 s collective timeout) runs every scenario of
``_dist_workers.run_suite`` in the same order on every rank; each rank
pickles what it saw and the tests below compare with the single-process
float64 NumPy norm of the concatenated full arrays and with the
single-process ``fastclip.clip_by_global_norm``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import _dist_workers as W  # noqa: E402

import fastclip  # noqa: E402

WORLDS = (2, 4)
RTOL = {"float32": 1e-6, "float64": 1e-12}
_CACHE: dict[int, list[dict[str, Any]]] = {}


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def suite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(world, per-rank results) of one spawned run of every scenario."""
    world = request.param
    if world not in _CACHE:
        _CACHE[world] = W.spawn_and_collect(W.run_suite, world, tmp_path_factory.mktemp)
    results = _CACHE[world]
    for res in results:
        assert "__crash__" not in res, res.get("__crash__")
    return world, results


def _ok(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    per_rank = [res[name] for res in results]
    for r, out in enumerate(per_rank):
        assert "error" not in out, f"rank {r}: {out}"
    return per_rank


def _ref_norm(arrays: list[np.ndarray], ord: float) -> float:
    return float(
        np.linalg.norm(np.concatenate([a.astype(np.float64).ravel() for a in arrays]), ord)
    )


CLIP_CASES = [
    (lib, dtype, ord, by_index)
    for lib in ("torch", "numpy")
    for dtype in ("float32", "float64")
    for ord in W.ORDS
    for by_index in ((False, True) if ord == 2.0 else (lib == "numpy",))
]


@pytest.mark.parametrize(
    ("lib", "dtype", "ord", "by_index"), CLIP_CASES, ids=lambda v: str(v).replace(".0", "")
)
def test_norm_and_clip_match_single_process(
    suite: Any, lib: str, dtype: str, ord: float, by_index: bool
) -> None:
    _world, results = suite
    per_rank = _ok(results, f"clip-{lib}-{dtype}-{ord}-{by_index}")
    sharded, replicated = W.global_set(np.dtype(dtype))
    ref = _ref_norm(sharded + replicated, ord)
    norms = [out["norm"] for out in per_rank]
    assert len(set(norms)) == 1, f"ranks disagree: {norms}"  # bit-identical on every rank
    assert norms[0] == pytest.approx(ref, rel=RTOL[dtype])
    assert per_rank[0]["norm_type"] == ("Tensor" if lib == "torch" else "ndarray")
    assert per_rank[0]["norm_dtype"].endswith(dtype)
    assert all(out["clip_norm"] == norms[0] for out in per_rank)
    # the clipped shards, reassembled, equal the single-process clip of the full arrays
    full = [a.copy() for a in sharded + replicated]
    expected, _ = fastclip.clip_by_global_norm(full, 0.5 * ref, ord, total_norm=norms[0])
    got = W.assemble([out["arrays"] for out in per_rank], len(sharded))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e.astype(np.float64), rtol=RTOL[dtype], atol=0)
    n = len(sharded)
    for out in per_rank[1:]:  # every rank scaled its replicated copies identically
        for a, b in zip(out["arrays"][n:], per_rank[0]["arrays"][n:]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(_ref_norm(got, ord), 0.5 * ref, rtol=1e-5)


def test_shards_are_uneven_with_empty_ones(suite: Any) -> None:
    world, _ = suite
    sizes = [
        [b[r + 1] - b[r] for r in range(world)]
        for b in (W.bounds(n, world, k) for k, n in enumerate(W.SHARDED_SIZES))
    ]
    assert any(0 in s for s in sizes) and any(len(set(s)) == world for s in sizes), sizes
    assert [sum(s) for s in sizes] == list(W.SHARDED_SIZES)


@pytest.mark.parametrize("ord", [1.0, 2.0, math.inf], ids=["1", "2", "inf"])
@pytest.mark.parametrize(("case", "expected"), [("nan", "nan"), ("inf", "inf"), ("naninf", "nan")])
def test_nonfinite_shard_on_one_rank(suite: Any, ord: float, case: str, expected: str) -> None:
    _, results = suite
    per_rank = _ok(results, f"{case}-{ord}")
    for r, out in enumerate(per_rank):
        if expected == "nan":
            assert math.isnan(out["norm"]), (r, out)
        else:
            assert out["norm"] == math.inf, (r, out)
        assert out["raised"] == "NonFiniteNormError", (r, out)  # error_if_nonfinite: all ranks
        # each rank names its own culprits (local positions), or says they are elsewhere
        assert out["indices"] == out["culprits"], (r, out)
        if out["culprits"]:
            assert f"local array {out['culprits'][0]}" in out["message"], (r, out)
        else:
            assert "another rank" in out["message"], (r, out)
        assert out["unchanged"], r  # nothing written on any rank
        assert out["is_tensor"]


@pytest.mark.parametrize(
    ("kind", "culprit", "culprit_error"),
    [
        ("count", None, None),
        ("dtype", None, None),
        ("ord", None, None),
        ("int", 1, "TypeError"),
        ("index", 0, "IndexError"),
    ],
)
def test_bad_input_raises_on_every_rank(
    suite: Any, kind: str, culprit: int | None, culprit_error: str | None
) -> None:
    _world, results = suite
    per_rank = _ok(results, f"bad-{kind}")
    ref = _ref_norm([a for part in W.global_set(np.float32) for a in part], 2.0)
    for r, out in enumerate(per_rank):
        if r == culprit:
            assert out["raised"] == culprit_error, (r, out)
        else:
            assert out["raised"] == "ValueError", (r, out)
            if culprit is None:
                assert "disagree on" in out["message"], out["message"]
            else:
                assert f"rank(s) [{culprit}]" in out["message"], out["message"]
                # the culprit's own error travelled in the gathered row
                assert f"rank {culprit}: {culprit_error}: " in out["message"], out["message"]
        assert out["unchanged"], r
        assert out["after"] == pytest.approx(ref, rel=1e-6)  # the group still works


@pytest.mark.parametrize("ord", [1.0, 2.0, 3.0, math.inf], ids=["1", "2", "3", "inf"])
def test_no_overflow_or_underflow_across_ranks(suite: Any, ord: float) -> None:
    # 1e200 on rank 0: a SUM all-reduce of squares would overflow float64 to inf
    world, results = suite
    per_rank = _ok(results, f"extreme-{ord}")
    big = np.full(3, 1e200)
    small = np.full(3 * (world - 1), 1e-200)
    tiny = np.full(2 * world, 1e-300)
    if ord == math.inf:
        ref = 1e200
    else:
        scaled = np.concatenate([big, small, tiny]) / 1e200
        ref = 1e200 * float(np.sum(scaled**ord) ** (1 / ord))
    for out in per_rank:
        assert out["norm"] == pytest.approx(ref, rel=1e-12)


def test_mixed_16bit_dtypes(suite: Any) -> None:
    _, results = suite
    per_rank = _ok(results, "mixed")
    sharded, _ = W.global_set(np.float32)
    got = W.assemble([out["arrays"] for out in per_rank], len(sharded))  # 16-bit values, exact
    ref = _ref_norm(got, 2.0)
    for out in per_rank:
        assert out["norm"] == pytest.approx(ref, rel=1e-6)
        assert out["dtype"] == "torch.float32"


@pytest.mark.parametrize("ord", [1.0, 2.0, math.inf], ids=["1", "2", "inf"])
def test_dtensor_shard_and_replicate(suite: Any, ord: float) -> None:
    _world, results = suite
    per_rank = _ok(results, f"dtensor1d-{ord}")
    sharded, replicated = W.global_set(np.float32)
    ref = _ref_norm(sharded + replicated, ord)
    expected, _ = fastclip.clip_by_global_norm(sharded + replicated, 0.5 * ref, ord)
    for out in per_rank:
        assert out["norm"] == pytest.approx(ref, rel=1e-6)
        assert out["total"] == out["norm"]
        assert out["total_type"] == "DTensor" and out["total_placements"] == "(Replicate(),)"
        for e, g in zip(expected, out["arrays"]):
            np.testing.assert_allclose(g, e, rtol=1e-6)
    assert any(0 in [out["local_sizes"][k] for out in per_rank] for k in range(len(sharded)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_dtensor_gradients_match_torch(suite: Any, dtype: str) -> None:
    """fastclip.torch.clip_grad_norm_ on 16-bit DTensor gradients returns torch's norm
    dtype and value; a norm beyond float16's range (2e4 * sqrt(64) = 1.6e5) raises with
    ``error_if_nonfinite=True`` on every rank as torch's does, with nothing written
    (bfloat16's range holds it: neither raises, and both clip)."""
    _world, results = suite
    for out in _ok(results, f"dtensor-{dtype}"):
        ours, ref = out["fastclip"], out["torch"]
        assert ours["dtype"] == ref["dtype"] == f"torch.{dtype}"
        assert ours["type"] == ref["type"] == "DTensor"
        assert ours["total"] == pytest.approx(ref["total"], rel=1e-2)
        for g, e in zip(ours["grads"], ref["grads"]):
            np.testing.assert_allclose(g, e, rtol=2e-2, atol=1e-3)
        want = "NonFiniteNormError" if dtype == "float16" else "no error"
        assert out["fastclip-big"] == want
        assert out["torch-big"] == ("RuntimeError" if dtype == "float16" else "no error")
        assert out["fastclip-big-unchanged"] == (dtype == "float16")
        assert out["torch-big-unchanged"] == (dtype == "float16")


def test_dtensor_2d_mesh(suite: Any) -> None:
    world, results = suite
    if world < 4:
        pytest.skip("a 2 x 2 mesh needs 4 ranks")
    per_rank = _ok(results, "dtensor2d")
    rng = np.random.default_rng(5)
    fulls = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(4)]
    ref2, ref1 = _ref_norm(fulls, 2.0), _ref_norm(fulls, 1.0)
    expected, _ = fastclip.clip_by_global_norm(fulls, 0.25 * ref2)
    for out in per_rank:
        assert out["norm2"] == pytest.approx(ref2, rel=1e-6)
        assert out["norm1"] == pytest.approx(ref1, rel=1e-6)
        for e, g in zip(expected, out["arrays"]):
            np.testing.assert_allclose(g, e, rtol=1e-6)


def test_dtensor_partial_is_refused_on_every_rank(suite: Any) -> None:
    _, results = suite
    for res in results:
        out = res["dtensor-partial"]
        assert out.get("error") == "NotImplementedError", out
        assert "Partial" in out["message"]


def test_fsdp2_fully_shard_matches_torch_single_process(suite: Any) -> None:
    _world, results = suite
    per_rank = _ok(results, "fsdp")
    model = W.fsdp_model()
    (model(W.fsdp_input()) ** 2).sum().backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    grads = [p.grad.double().numpy() for p in model.parameters()]
    for out in per_rank:
        assert out["total_type"] == "DTensor"
        assert out["total"] == pytest.approx(float(total), rel=1e-5)
        for g, e in zip(out["grads"], grads):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
    sizes = [out["local_sizes"] for out in per_rank]
    assert all(sum(col) == p.numel() for col, p in zip(zip(*sizes), model.parameters()))


def test_has_dtensor_is_false_for_plain_tensors() -> None:
    import fastclip.distributed as fcd

    assert not fcd.has_dtensor([torch.zeros(2), np.zeros(2)])
