"""fastclip.distributed in every parallel layout, on spawned gloo groups (issue 19).

This file owns the multi-mesh, multi-group behaviour of fastclip.distributed:
DTensors on several meshes (dense on dp x tp, experts on dp x ep), pipeline
stages (pp x tp on 4 ranks, pp x dp x tp on 8) as plain tensors with a
``Layout`` and as DTensors on stage meshes, tied embeddings across stages,
FSDP2 + tensor parallel, the same model split 1, 2, 4 and 8 ways, and the
adaptive clippers and fused optimizers across ranks.  One spawn per world
size (2, 4, 8 ranks on 127.0.0.1, tiny tensors) runs every scenario of
``_layout_workers``; each is checked here against the single-process
float64 NumPy norm of the full, de-duplicated arrays (and single-process
torch for FSDP2 + TP, single-process clippers and optimizers fed the full
gradients).  The single-mesh behaviour is in test_distributed.py.
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
import _layout_adaptive as A  # noqa: E402
import _layout_workers as L  # noqa: E402

WORLDS = (2, 4, 8)
_CACHE: dict[int, list[dict[str, Any]]] = {}


def _spawned(world: int, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if world not in _CACHE:
        _CACHE[world] = W.spawn_and_collect(L.run_layouts, world, tmp_path_factory.mktemp)
    for res in _CACHE[world]:
        assert "__crash__" not in res, res.get("__crash__")
    return world, _CACHE[world]


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def suite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _spawned(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=[w for w in WORLDS if w >= 4], ids=lambda w: f"world{w}")
def suite_tp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The worlds with a tensor-parallel partner to disagree with (4 ranks or more)."""
    return _spawned(request.param, tmp_path_factory)


def _ok(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    per_rank = [res[name] for res in results]
    for r, out in enumerate(per_rank):
        assert "error" not in out, f"rank {r}: {out}"
    return per_rank


def _norm(arrays: list[np.ndarray], ord: float) -> float:
    return float(
        np.linalg.norm(np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]), ord)
    )


def _f32(names: dict[str, Any]) -> list[np.ndarray]:
    return [L.full(n, shape).astype(np.float32) for n, (shape, _) in names.items()]


def _close32(got: float, ref: float) -> None:
    """``got`` (a float32 result) is ``ref`` (float64) rounded to float32."""
    assert abs(got - ref) <= 0.5 * float(np.spacing(np.float32(ref))) + 1e-12 * ref, (got, ref)


# ------------------------------------------------------------------ meshes


@pytest.mark.parametrize("ord", L.ORDS, ids=lambda o: str(o).replace(".0", ""))
def test_dense_and_expert_meshes_in_one_call(suite: Any, ord: float) -> None:
    _, results = suite
    per_rank = _ok(results, "meshes")
    dense, experts = _f32(L.DENSE), _f32(L.EXPERTS)
    for out in per_rank:
        _close32(out[f"dense-{ord}"], _norm(dense, ord))
        _close32(out[f"moe-{ord}"], _norm(dense + experts, ord))
    assert len({out[f"moe-{ord}"] for out in per_rank}) == 1  # bit-identical on every rank


def test_clip_over_two_meshes_matches_single_process(suite: Any) -> None:
    world, results = suite
    per_rank = _ok(results, "meshes")
    fulls = _f32(L.DENSE) + _f32(L.EXPERTS)
    ref = _norm(fulls, 2.0)
    coef = min(1.0, 0.5 * ref / (ref + 1e-6))
    for out in per_rank:
        _close32(out["clip_norm"], ref)
        assert out["total_type"] == "DTensor"  # one mesh: a Replicate DTensor, as torch
        for got, want in zip(out["clipped"], fulls):
            np.testing.assert_allclose(got, want.astype(np.float64) * coef, rtol=2e-6)
    sizes = np.array([out["local_sizes"] for out in per_rank])
    assert any(len(set(col)) > 1 for col in sizes.T)  # uneven shards
    if world == 8:
        assert (sizes == 0).any()  # 5 rows over 4 tensor-parallel ranks: one is empty


# ------------------------------------------------------------------ pipeline


@pytest.mark.parametrize("kind", ["pp-plain", "pp-dtensor"])
def test_pipeline_stages_with_a_tied_embedding(suite: Any, kind: str) -> None:
    _, results = suite
    per_rank = _ok(results, kind)
    model = L.unique_model(np.float32)
    emb = L.full("emb", L.STAGES[0]["emb"][0]).astype(np.float32)
    ref64 = _norm(L.unique_model(np.float64), 2.0)
    for out in per_rank:
        for ord in L.ORDS:
            _close32(out[f"norm-{ord}"], _norm(model, ord))
        assert out["norm-float64"] == pytest.approx(ref64, rel=1e-12)
        _close32(out["norm-float32"], _norm(model, 2.0))
        # the tie left out, the head counts twice (Megatron-LM PR 7228's inflation)
        _close32(out["untied"], _norm([*model, emb], 2.0))
        _close32(out["clip_norm"], _norm(model, 2.0))
        coef = 1.0 / (_norm(model, 2.0) + 1e-6)
        assert out["ratios"] == pytest.approx([coef] * len(out["ratios"]), rel=1e-5)


# ------------------------------------------------------------------ FSDP2 + TP


def test_fsdp2_with_tensor_parallel_matches_torch_single_process(suite: Any) -> None:
    world, results = suite
    per_rank = _ok(results, "fsdp-tp")
    model = L._fsdp_tp_model()
    (model(L.fsdp_tp_input()) ** 2).sum().backward()
    ln = [p.grad.double().numpy().copy() for p in model[3].parameters()]
    total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
    grads = [p.grad.double().numpy() for p in model.parameters()]
    tp = world // 2
    for out in per_rank:
        assert out["mesh_dims"] == [2, 2, 2, 2, 1, 1]  # the LayerNorm: FSDP's dp mesh only
        assert out["total"] == pytest.approx(total, rel=1e-5)
        # counted on every tp rank, the LayerNorm inflates the norm (ROCm TE PR 715)
        inflated = math.sqrt(total**2 + (tp - 1) * sum(float(np.sum(g**2)) for g in ln))
        assert out["naive"] == pytest.approx(inflated, rel=1e-5)
        for got, want in zip(out["grads"], grads):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ replication


def test_the_same_memory_twice_counts_once(suite: Any) -> None:
    _, results = suite
    w = L.full("tie", (5,)).astype(np.float32)
    other = L.full("other", (3,)).astype(np.float32)
    for out in _ok(results, "ties"):
        _close32(out["twice"], _norm([w, other], 2.0))  # w, w again, w.view(5)
        _close32(out["replicated"], _norm([w, other], 2.0))
        _close32(out["part"], _norm([w, other, w[:3]], 2.0))  # a part is other memory
        assert out["row_device"] == "cpu"  # CPU tensors on gloo: no device involved
        assert out["types"] == ["cpu", "cuda"]


# ------------------------------------------------------------------ non-finite, bad input


@pytest.mark.parametrize("case", ["nan", "inf"])
def test_nonfinite_shard_on_one_rank(suite: Any, case: str) -> None:
    _, results = suite
    for r, out in enumerate(_ok(results, f"nonfinite-{case}")):
        assert math.isnan(out["norm"]) if case == "nan" else out["norm"] == math.inf, (r, out)
        assert out["raised"] == "NonFiniteNormError", (r, out)
        assert out["unchanged"], r


@pytest.mark.parametrize("kind", L.BAD_KINDS)
def test_disagreeing_ranks_raise_everywhere_and_write_nothing(suite_tp: Any, kind: str) -> None:
    _, results = suite_tp
    per_rank = _ok(results, f"bad-{kind}")
    for r, out in enumerate(per_rank):
        if kind == "layout-type" and r == 1:
            assert out["raised"] == "TypeError", out
            assert "layout entries must be Layout or None" in out["message"]
        elif kind == "layout-type":
            assert out["raised"] == "ValueError", out
            assert "rank(s) [1] of the group rejected their input" in out["message"]
        else:
            assert out["raised"] == "ValueError", (r, out)
            assert "the ranks disagree on" in out["message"], out["message"]
            assert "nothing was modified" in out["message"]
        assert out["seconds"] < 20, out  # decided from the one gather, never a timeout
        assert out["unchanged"], r
        _close32(out["after"], _norm(_f32(L.DENSE), 2.0))  # the group still works


# ------------------------------------------------------------------ split invariance


def test_norm_does_not_depend_on_the_split(suite: Any) -> None:
    world, results = suite
    model = L.split_model()
    by_dtype = {
        "float64": model,
        "float32": [a.astype(np.float32) for a in model],
        "bfloat16": [torch.from_numpy(a).to(torch.bfloat16).double().numpy() for a in model],
    }
    splits = [k for k in (1, 2, 4, 8) if k <= world]
    for ord in (2.0, 1.0):
        for dtype, arrays in by_dtype.items():
            ref = _norm(arrays, ord)
            for k in splits:
                for r in range(k):
                    got, got_dtype = results[r]["splits"][f"{k}-{dtype}-{ord}"]
                    if dtype == "float64":
                        assert got == pytest.approx(ref, rel=1e-12), (k, r)
                        assert got_dtype == "torch.float64"
                    else:
                        _close32(got, ref)
                        assert got_dtype == "torch.float32"


# ------------------------------------------------------------------ adaptive


def _reference_clipper(kind: str) -> tuple[Any, list[float], list[np.ndarray]]:
    clipper = A.clippers()[kind]
    params = [torch.from_numpy(p) for p in A.reference_params()]
    norms: list[float] = []
    grads: list[Any] = []
    for t in range(A.STEPS):
        grads = [torch.from_numpy(g) for g in A.reference_grads(t)]
        norms.append(float(clipper(grads, params if kind == "agc" else None)))
    return clipper.state_dict(), norms, [g.double().numpy() for g in grads]


def _assert_state_close(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5), key
        elif isinstance(value, list) and value and isinstance(value[0], float):
            assert got[key] == pytest.approx(value, rel=1e-5), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("kind", ["global", "autoclip", "zclip", "agc"])
def test_adaptive_clippers_keep_identical_state_on_every_rank(suite: Any, kind: str) -> None:
    _, results = suite
    per_rank = _ok(results, f"clipper-{kind}")
    for out in per_rank[1:]:
        assert out["state"] == per_rank[0]["state"]  # exactly equal, after 20 steps
        assert out["norms"] == per_rank[0]["norms"]
    state, norms, grads = _reference_clipper(kind)
    _assert_state_close(per_rank[0]["state"], state)
    assert per_rank[0]["norms"] == pytest.approx(norms, rel=1e-5)
    for got, want in zip(per_rank[0]["grads"], grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_autoclip_over_pipeline_stages(suite: Any) -> None:
    _, results = suite
    per_rank = _ok(results, "clipper-pp")
    for out in per_rank[1:]:
        assert out["state"] == per_rank[0]["state"]
    from fastclip.adaptive import AutoClip

    ref = AutoClip(50)
    for t in range(A.STEPS):
        ref([torch.from_numpy(a * np.float32(A.scale_at(t))) for a in L.unique_model(np.float32)])
    _assert_state_close(per_rank[0]["state"], ref.state_dict())


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_fused_optimizers_with_dtensor_parameters(suite: Any, kind: str) -> None:
    _, results = suite
    per_rank = _ok(results, f"fused-{kind}")
    for out in per_rank[1:]:
        assert out["norms"] == per_rank[0]["norms"]
        for a, b in zip(out["params"], per_rank[0]["params"]):
            np.testing.assert_array_equal(a, b)
        for sa, sb in zip(out["state"], per_rank[0]["state"]):
            for key in sb:
                np.testing.assert_array_equal(sa[key], sb[key])
    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in A.reference_params()]
    opt = A.fused(kind, params)
    norms = []
    for t in range(A.STEPS):
        for p, g in zip(params, A.reference_grads(t)):
            p.grad = torch.from_numpy(g)
        opt.step()
        norms.append(float(opt.last_total_norm))
    assert per_rank[0]["norms"] == pytest.approx(norms, rel=1e-5)
    for got, p in zip(per_rank[0]["params"], params):
        np.testing.assert_allclose(got, p.detach().double().numpy(), rtol=1e-5, atol=1e-6)
    for got, p in zip(per_rank[0]["state"], params):
        for key, value in opt.state[p].items():
            np.testing.assert_allclose(got[key], value.double().numpy(), rtol=1e-4, atol=1e-7)


def test_fused_adamw_over_pipeline_stages_with_a_plan(suite: Any) -> None:
    _, results = suite
    per_rank = _ok(results, "fused-pp")
    for out in per_rank[1:]:
        assert out["norms"] == per_rank[0]["norms"]
    model = L.unique_model(np.float32)
    params = [torch.nn.Parameter(torch.zeros(a.shape)) for a in model]
    opt = A.fused("adamw", params)
    norms = []
    for t in range(A.STEPS):
        for p, a in zip(params, model):
            p.grad = torch.from_numpy(a) * A.scale_at(t)
        opt.step()
        norms.append(float(opt.last_total_norm))
    assert per_rank[0]["norms"] == pytest.approx(norms, rel=1e-5)


def test_one_rank_refusing_refuses_clipper_and_optimizer_steps_everywhere(suite: Any) -> None:
    _, results = suite
    for r, out in enumerate(_ok(results, "refusals")):
        for what in ("clipper", "fused"):
            raised, message = out[what]
            assert raised is not None, (r, what)
            if r == 1:
                assert "rank(s)" not in message, message  # its own error
            else:
                assert raised == "ValueError", (r, what, message)
                assert "rank(s) [1] of the group rejected their input" in message, message
        assert out["clipper_state_unchanged"] and out["clipper_arrays_unchanged"], r
        assert out["fused_unchanged"], r
        assert out["seconds"] < 20, out


# ------------------------------------------------------------------ in-process units


def test_row_device_follows_the_backend() -> None:
    """The NCCL decision, without NCCL: CPU arrays reduce through CUDA only where the
    backend cannot take CPU tensors (the CUDA path itself is not run here)."""
    from fastclip.distributed._devices import backend_device_types, row_device

    cpu, cuda1 = torch.device("cpu"), torch.device("cuda", 1)
    assert backend_device_types("nccl") == {"cuda"}
    assert backend_device_types("gloo") == {"cpu", "cuda"}
    assert backend_device_types("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}
    assert row_device(cpu, frozenset({"cuda"}), 0) == torch.device("cuda", 0)
    assert row_device(cpu, frozenset({"cpu", "cuda"}), 0) == cpu
    assert row_device(None, frozenset({"cuda"}), 2) == torch.device("cuda", 2)
    assert row_device(cuda1, frozenset({"cuda"}), 0) == cuda1
    assert row_device(cuda1, frozenset({"cpu", "cuda"}), 0) == cuda1
    with pytest.raises(ValueError, match="no CUDA device is available"):
        row_device(cpu, frozenset({"cuda"}), None)


def test_layout_refuses_what_is_not_a_group() -> None:
    import fastclip.distributed as fcd

    with pytest.raises(TypeError, match="replicated_over takes process groups"):
        fcd.Layout(replicated_over=["tp"])
    with pytest.raises(TypeError, match="sharded_over takes process groups"):
        fcd.Layout(sharded_over=[3])
