"""BackwardNorm and ``norm_in_backward`` across gloo ranks: DDP and FSDP2.

This file owns the distributed behaviour of the norm taken during backward:
under DDP the hooks see each rank's local gradient, DDP then writes the
all-reduced one, and the norm must be that of the all-reduced gradients
(each hooked gradient is measured again); under FSDP2 the hooks measure local
shards, reduced over the mesh.  The reference is single-process torch: the
whole batch, ``clip_grad_norm_`` and ``torch.optim.AdamW``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import _backward_norm_workers as B  # noqa: E402
import _dist_workers as W  # noqa: E402

_CACHE: dict[int, list[dict[str, Any]]] = {}


@pytest.fixture(scope="module", params=(2,), ids=lambda w: f"world{w}")
def suite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    world = request.param
    if world not in _CACHE:
        _CACHE[world] = W.spawn_and_collect(B.run_suite, world, tmp_path_factory.mktemp)
    for res in _CACHE[world]:
        assert "__crash__" not in res, res.get("__crash__")
    return world, _CACHE[world]


def _reference() -> tuple[list[float], list[np.ndarray]]:
    """Single process, whole batches: torch's clip_grad_norm_ + AdamW."""
    net = B.model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    norms = []
    for x in B.batches():
        net(x).pow(2).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), B.MAX_NORM)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms, [p.detach().double().numpy() for p in net.parameters()]


def _ok(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    per_rank = [res[name] for res in results]
    for r, out in enumerate(per_rank):
        assert "error" not in out, f"rank {r}: {out}"
    return per_rank


@pytest.mark.parametrize("form", ["fused", "standalone"])
def test_ddp_norm_is_the_all_reduced_gradients_norm(suite: Any, form: str) -> None:
    _world, results = suite
    ref_norms, ref_weights = _reference()
    assert all(n > B.MAX_NORM for n in ref_norms)  # every step clips
    for out in _ok(results, f"ddp-{form}"):
        np.testing.assert_allclose(out["norms"], ref_norms, rtol=1e-5)
        # the hooks saw local gradients; DDP's write moved their version counters
        assert all(k == 4 for k in out["remeasured"])
        for w, e in zip(out["weights"], ref_weights):
            np.testing.assert_allclose(w, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["fused", "standalone", "view-fused"])
def test_ddp_comm_hook_measures_the_all_reduced_buckets(suite: Any, form: str) -> None:
    """register_ddp: the norms come from DDP's reduced buckets, no re-measurement
    (also with gradient_as_bucket_view=True, where .grad are views of the buckets)."""
    _world, results = suite
    ref_norms, ref_weights = _reference()
    for out in _ok(results, f"ddp-comm-{form}"):
        np.testing.assert_allclose(out["norms"], ref_norms, rtol=1e-5)
        assert all(k == 0 for k in out["remeasured"])
        for w, e in zip(out["weights"], ref_weights):
            np.testing.assert_allclose(w, e, rtol=1e-5, atol=1e-6)


def test_fsdp2_shards_reduced_over_the_mesh(suite: Any) -> None:
    _world, results = suite
    ref_norms, ref_weights = _reference()
    for out in _ok(results, "fsdp"):
        np.testing.assert_allclose(out["norms"], out["torch_norms"], rtol=1e-5)
        np.testing.assert_allclose(out["norms"], ref_norms, rtol=1e-5)
        assert out["remeasured"] == 0  # the hooks' shard norms were used
        for w, e in zip(out["weights"], ref_weights):
            np.testing.assert_allclose(w, e, rtol=1e-5, atol=1e-6)
