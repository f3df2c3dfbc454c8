"""``fastclip bench``'s fused-step workloads: adamw (clip_grad_norm_ + one AdamW
step) and per-sample (DP-SGD clipping), their correctness checks against
torch.optim.AdamW and the Opacus formula in float64, every CPU backend, and
the guards that mark a row n/a.

The single-array and many-array workloads, JSON, --compare, the plot and the
progress bar are in ``test_bench.py``; tiny configurations come from the
``bench_config`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fastclip._bench import BenchConfig, run
from fastclip._bench import registry as bb
from fastclip._bench.data import CaseData
from fastclip._bench.workloads import cases_for

# Every test here runs with the 1 MiB bandwidth probe of tests/conftest.py.
pytestmark = pytest.mark.usefixtures("small_probe")


# ---------------------------------------------------------------- adamw workload


def _small_adamw_case() -> object:
    from fastclip._bench.workloads import Case

    shapes = ((300, 40), (40,), (1000,), (7, 3, 5))
    return Case("adamw", "adamw", "adamw small", shapes, sum(math.prod(s) for s in shapes))


def _adamw_reference(d: CaseData) -> list[np.ndarray]:
    """One torch.optim.AdamW step after clip_grad_norm_, in float64 (independent of the
    check's closed form)."""
    torch = pytest.importorskip("torch")
    from fastclip._bench.data import ADAMW

    params = [
        torch.nn.Parameter(torch.from_numpy(p.astype(np.float64))) for p in d.param_copies("numpy")
    ]
    for p, g in zip(params, d.numpy_arrays()):
        p.grad = torch.from_numpy(g.astype(np.float64))
    opt = torch.optim.AdamW(params, **ADAMW, foreach=False)
    torch.nn.utils.clip_grad_norm_(params, d.max_norm)
    opt.step()
    out = [p.detach().numpy() for p in params]
    return out + [opt.state[p]["exp_avg"].numpy() for p in params]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adamw_check_accepts_torch_reference_and_rejects_wrong(dtype: str) -> None:
    d = CaseData(_small_adamw_case(), dtype)  # type: ignore[arg-type]
    good = _adamw_reference(d)
    err, ok = d.check(good, "fastclip")
    assert ok and err < (1e-12 if dtype == "float64" else 1e-6)
    n = len(good) // 2
    unclipped = [m / d.coef for m in good[n:]]  # moments without the clip coefficient
    assert d.check(good[:n] + unclipped, "peer")[1] is False
    stale = [p * 1.0 for p in d.param_copies("numpy")]  # parameters not updated
    assert d.check(stale + good[n:], "fastclip")[1] is False
    assert d.check(good[:-1], "peer") == (math.inf, False)
    nan = [np.full_like(g, np.nan) for g in good]
    assert d.check(nan, "peer") == (math.inf, False)


def _run_small_case(case: object, backends: list, config: BenchConfig) -> dict:  # type: ignore[type-arg]
    """One small case, float32, one round, with a 10 GB/s floor: rows by backend."""
    from fastclip._bench.runner import run_case

    rows = run_case(
        case,  # type: ignore[arg-type]
        "float32",
        backends,
        config,
        {"cpu": {"bytes_per_s": 1e10}},
        lambda s: None,
    )
    return {r["backend"]: r for r in rows}


def test_adamw_workload_every_cpu_backend(bench_config: Any) -> None:
    pytest.importorskip("torch")

    names = ["fastclip", "fastclip-torch", "numpy", "torch-foreach", "torch-loop", "torch-fused"]
    usable = [bb.BACKENDS[n] for n in names]
    by = _run_small_case(_small_adamw_case(), usable, bench_config(repeat=1))
    for name in names:
        r = by[name]
        if name == "torch-fused" and r["status"] == "n/a":
            assert "fused=True" in r["reason"]  # an older CPU build
            continue
        assert r["status"] == "ok", r
        assert r["max_rel_err"] < 2e-6 and r["floor_fraction"] > 0
    # 8 passes over the gradients' bytes
    f = by["fastclip"]
    assert f["floor_s"] == pytest.approx(8 * f["nbytes"] / 1e10)


def test_adamw_16_bit_is_na_and_fused_peer_only_runs_adamw(bench_config: Any) -> None:
    pytest.importorskip("torch")
    report = run(
        bench_config(workloads=("tiny",), backends=("fastclip", "torch-fused"), dtypes=("float32",))
    )
    (fused,) = [r for r in report["results"] if r["backend"] == "torch-fused"]
    assert fused["status"] == "n/a" and "adamw workload only" in fused["reason"]
    from fastclip._bench.runner import run_case

    (row,) = run_case(
        _small_adamw_case(),  # type: ignore[arg-type]
        "float16",
        [bb.BACKENDS["fastclip"]],
        bench_config(),
        {},
        lambda s: None,
    )
    assert row["status"] == "n/a" and "float32 and float64" in row["reason"]


def test_adamw_memory_guard(bench_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import fastclip._bench.runner as runner

    (case,) = cases_for("adamw", None, True)  # --full: GPT-2 small
    assert case.size == 124_439_808 and case.passes == 8
    monkeypatch.setattr(runner.os, "sysconf", lambda name: 1024 if "PAGES" in name else 4096)
    (row,) = runner.run_case(
        case, "float32", [bb.BACKENDS["fastclip"]], bench_config(), {}, lambda s: None
    )
    assert row["status"] == "n/a" and "GiB" in row["reason"] and "--backends" in row["reason"]


# ---------------------------------------------------------------- per-sample workload


def _small_per_sample_case() -> object:
    from fastclip._bench.workloads import Case

    shapes = ((32, 40, 30), (32, 30), (32, 500), (32, 3))
    return Case("per-sample", "persample", "ps small", shapes, sum(math.prod(s) for s in shapes))


def test_per_sample_check_accepts_the_opacus_formula_and_rejects_wrong() -> None:
    torch = pytest.importorskip("torch")
    d = CaseData(_small_per_sample_case(), "float64")  # type: ignore[arg-type]
    assert 0 < np.count_nonzero(d.sample_coef < 1) < 32  # some samples clipped, some not
    grads = [torch.from_numpy(a.copy()) for a in d.numpy_arrays()]
    per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grads]
    norms = torch.stack(per_param, dim=1).norm(2, dim=1)
    factor = (d.max_norm / (norms + 1e-6)).clamp(max=1.0)
    good = [torch.einsum("i,i...", factor, g) for g in grads]  # Opacus, independently
    err, ok = d.check(good, "fastclip")
    assert ok and err < 1e-13
    unclipped = [g.sum(0) for g in grads]
    assert d.check(unclipped, "peer")[1] is False
    assert d.check(good[:-1], "peer") == (math.inf, False)
    assert d.check([g[None] for g in good], "peer") == (math.inf, False)


def test_per_sample_workload_every_cpu_backend(bench_config: Any) -> None:
    pytest.importorskip("torch")

    names = ["fastclip", "fastclip-torch", "numpy", "torch-foreach", "torch-loop", "opacus"]
    usable = [bb.BACKENDS[n] for n in names if bb.BACKENDS[n].probe() is None]
    by = _run_small_case(_small_per_sample_case(), usable, bench_config(repeat=1))
    assert by["torch-loop"]["status"] == "n/a"
    for name in ("fastclip", "fastclip-torch", "numpy", "torch-foreach", "opacus"):
        if name not in by:
            continue  # opacus not installed
        assert by[name]["status"] == "ok", by[name]
        assert by[name]["max_rel_err"] < 2e-6
    f = by["fastclip"]
    assert f["floor_s"] == pytest.approx(2 * f["nbytes"] / 1e10)
    (case,) = cases_for("per-sample", None, True)  # --full; the quick suite clips 32
    assert case.shapes[0] == (256, 784, 1024) and case.size == 256 * 1_068_810


def test_opacus_backend_only_runs_per_sample(bench_config: Any) -> None:
    pytest.importorskip("opacus")
    report = run(bench_config(backends=("fastclip", "opacus")))
    (row,) = [r for r in report["results"] if r["backend"] == "opacus"]
    assert row["status"] == "n/a" and "per-sample workload only" in row["reason"]


# ---------------------------------------------------------------- train workload


@pytest.fixture
def tiny_train(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("torch")
    from fastclip._bench import train

    for key, value in {"vocab": 64, "d": 16, "layers": 1, "heads": 2, "seq": 8}.items():
        monkeypatch.setitem(train.MODEL, key, value)
    return train


def test_train_workload_rows_and_shares(bench_config: Any, tiny_train: Any) -> None:
    from fastclip._bench.report import format_table

    report = run(bench_config(workloads=("train",), dtypes=("float32", "float64"), repeat=2))
    rows = {(r["backend"], r["dtype"]): r for r in report["results"]}
    for form in tiny_train.FORMS:
        r = rows[(form, "float32")]
        assert r["status"] == "ok", r
        assert r["role"] == tiny_train.ROLES[form] and r["median_s"] > 0
        # one step of each form against torch's step clipped with the float64 norm
        assert r["max_rel_err"] <= (1e-4 if r["role"] == "fastclip" else 1e-2)
        assert "floor_s" not in r  # compute-bound: no bandwidth floor
        assert rows[(form, "float64")]["status"] == "n/a"
    assert rows[("fastclip-torch", "float32")]["speedup"].keys() == {
        "torch-fused",
        "torch-fused-noclip",
    }
    shares = tiny_train.clip_shares(report["results"])
    assert set(shares) == {"torch", "fastclip"}
    med = {f: rows[(f, "float32")]["median_s"] for f in tiny_train.FORMS}
    assert shares["torch"] == pytest.approx(1 - med["torch-fused-noclip"] / med["torch-fused"])
    assert "train: share of a training step spent clipping" in format_table(report)


def test_train_workload_flags_a_wrong_step(
    bench_config: Any, tiny_train: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tiny_train.make_step

    def wrong(form: str, model: Any, idx: Any) -> Any:
        if form == "fastclip-torch":  # no clipping where the form clips
            return real("fastclip-noclip", model, idx)
        return real(form, model, idx)

    monkeypatch.setattr(tiny_train, "make_step", wrong)
    report = run(bench_config(workloads=("train",), repeat=1))
    rows = {r["backend"]: r for r in report["results"]}
    assert rows["fastclip-torch"]["status"] == "FAILED"
    assert "differ from the reference" in rows["fastclip-torch"]["reason"]
    assert rows["fastclip-noclip"]["status"] == "ok"
