"""``fastclip._bench``: workloads, the correctness check, JSON, --compare, the plot.

Everything runs on tiny sizes with a 1 MiB bandwidth probe, so the file takes a
few seconds; the real figures come from ``fastclip bench`` itself.
"""

from __future__ import annotations

import io
import json
import math
import time

import numpy as np
import pytest

from fastclip._bench import BenchConfig, run, timing
from fastclip._bench import registry as bb
from fastclip._bench.data import CaseData
from fastclip._bench.progress import Progress
from fastclip._bench.report import compare, format_table, load_json, write_json
from fastclip._bench.workloads import WORKLOADS, cases_for, gpt2_shapes
from fastclip.cli import main

# Every test here runs with the 1 MiB bandwidth probe of tests/conftest.py.
pytestmark = pytest.mark.usefixtures("small_probe")


def _cfg(**kw: object) -> BenchConfig:
    base: dict[str, object] = dict(
        workloads=("single",),
        sizes=(1000,),
        repeat=2,
        backends=("fastclip", "numpy"),
        progress=False,
    )
    base.update(kw)
    return BenchConfig(**base)  # type: ignore[arg-type]


def _wrong_backend() -> bb.Backend:
    """Scales by twice the right coefficient: a plausible bug."""

    def make(d: CaseData, inplace: bool) -> bb.Op:
        arrays = d.numpy_arrays()

        def op() -> list[np.ndarray]:
            for a in arrays:
                a *= a.dtype.type(2 * d.coef)
            return arrays

        return op

    return bb.Backend(
        "wrong", "peer", "cpu", "cpu", "host", "a deliberately wrong peer", lambda: None, make
    )


# ---------------------------------------------------------------- workloads


def test_inner_count_is_sized_on_the_fastest_call_not_the_first() -> None:
    """A slow first call (evicted data, a peer's spinning threads) must not make
    blocks of one call; blocks aim at TARGET_BLOCK_S of the steady-state time."""
    delays = [0.05, 2e-4, 2e-4, 2e-4]

    def fn() -> None:
        time.sleep(delays.pop(0) if delays else 2e-4)

    n = timing.inner_count("cpu", fn)
    # sized on ~0.2 ms (sleep overshoots a little): ~10 calls; on the first call it would be 1
    assert 3 <= n <= math.ceil(timing.TARGET_BLOCK_S / 2e-4)
    assert timing.inner_count("cpu", fn, max_inner=1) == 1


def test_gpt2_small_shapes() -> None:
    shapes = gpt2_shapes(768, 12)
    assert len(shapes) == 148
    assert sum(math.prod(s) for s in shapes) == 124_439_808
    assert shapes[0] == (50257, 768) and shapes[1] == (1024, 768)
    assert (768, 2304) in shapes and (3072, 768) in shapes


def test_gpt2_xl_shapes() -> None:
    shapes = gpt2_shapes(1600, 48)
    assert len(shapes) == 4 + 12 * 48
    assert 1.55e9 < sum(math.prod(s) for s in shapes) < 1.56e9


def test_cases() -> None:
    (tiny,) = cases_for("tiny", None, False)
    assert len(tiny.shapes) == 2000 and tiny.size == 2_000_000
    assert [c.size for c in cases_for("single", None, True)] == [10**k for k in range(3, 9)]
    (rows,) = cases_for("rows", (2560,), False)
    assert rows.shapes == ((256, 10),)
    assert not WORKLOADS["gpt2-xl"].in_quick


# ---------------------------------------------------------------- correctness check


@pytest.mark.parametrize("kind", ["single", "rows", "value", "norm"])
def test_check_accepts_reference_and_rejects_wrong(kind: str) -> None:
    (case,) = cases_for(kind, (4096,), False)
    d = CaseData(case, "float32")
    x = d.numpy_arrays()[0].astype(np.float64)
    if kind == "single":
        good = [x * d.coef]
    elif kind == "rows":
        good = [x * d.row_coef[:, None]]
    elif kind == "value":
        good = [np.clip(x, -1, 1)]
    else:
        good = np.asarray(np.linalg.norm(x))
    err, ok = d.check(good, "fastclip")
    assert ok and err < 1e-6
    bad = [g * 1.01 for g in good] if kind != "norm" else good * 1.01
    err, ok = d.check(bad, "fastclip")
    assert not ok and err > 1e-3
    nan = [np.full_like(g, np.nan) for g in good] if kind != "norm" else np.asarray(np.nan)
    assert d.check(nan, "peer") == (math.inf, False)


def test_check_rejects_wrong_shape_and_count() -> None:
    (case,) = cases_for("tiny", None, False)
    d = CaseData(case, "float32")
    arrays = d.numpy_arrays()
    assert d.check(arrays[:-1], "peer")[1] is False
    assert d.check([a.reshape(10, 100) for a in arrays], "peer")[1] is False


def test_wrong_backend_is_reported_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bb.BACKENDS, "wrong", _wrong_backend())
    report = run(_cfg(backends=("fastclip", "numpy", "wrong")))
    by = {r["backend"]: r for r in report["results"]}
    assert by["wrong"]["status"] == "FAILED"
    assert "median_s" not in by["wrong"] and "gbps" not in by["wrong"]
    assert "wrong" not in by["fastclip"]["speedup"]  # a wrong result is never a time
    assert by["fastclip"]["status"] == "ok" and by["numpy"]["status"] == "ok"
    table = format_table(report)
    assert "FAILED" in table and "max relative error" in table


def test_wrong_fastclip_result_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = _wrong_backend()
    monkeypatch.setitem(
        bb.BACKENDS,
        "fastclip",
        bb.Backend(
            "fastclip", "fastclip", "cpu", "cpu", "host", "broken", lambda: None, wrong.make
        ),
    )
    code = main(
        [
            "bench",
            "--workloads",
            "single",
            "--sizes",
            "1e3",
            "--repeat",
            "1",
            "--backends",
            "fastclip,numpy",
            "--quiet",
        ]
    )
    assert code == 1
    assert "FAILED" in capsys.readouterr().out


def test_raising_backend_is_an_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(d: CaseData, inplace: bool) -> bb.Op:
        def op() -> None:
            raise RuntimeError("boom")

        return op

    monkeypatch.setitem(
        bb.BACKENDS,
        "boom",
        bb.Backend("boom", "peer", "cpu", "cpu", "host", "raises", lambda: None, make),
    )
    report = run(_cfg(backends=("numpy", "boom")))
    by = {r["backend"]: r for r in report["results"]}
    assert by["boom"]["status"] == "error" and "boom" in by["boom"]["reason"]


def test_not_implemented_is_skipped_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(d: CaseData, inplace: bool) -> bb.Op:
        def op() -> None:
            raise NotImplementedError("no GPU backend yet")

        return op

    monkeypatch.setitem(
        bb.BACKENDS,
        "gpu-ish",
        bb.Backend("gpu-ish", "fastclip", "cpu", "cpu", "host", "", lambda: None, make),
    )
    report = run(_cfg(backends=("gpu-ish",)))
    (r,) = report["results"]
    assert r["status"] == "skipped" and "no GPU backend yet" in r["reason"]


def test_gpu_backends_skipped_with_reason_without_gpu() -> None:
    if bb.gpu_storage() is not None:
        pytest.skip("a CUDA GPU is usable here")
    report = run(_cfg(backends=("fastclip", "fastclip-gpu", "torch-cuda-foreach", "cupy")))
    skipped = report["skipped_backends"]
    assert set(skipped) == {"fastclip-gpu", "torch-cuda-foreach", "cupy"}
    assert all(skipped.values())
    assert "fastclip-gpu" in format_table(report)


# ---------------------------------------------------------------- backends, dtypes, modes


@pytest.mark.parametrize("inplace", [True, False])
def test_all_kinds_all_cpu_backends(inplace: bool) -> None:
    pytest.importorskip("torch")
    report = run(
        _cfg(
            workloads=("single", "rows", "value", "norm"),
            sizes=(2048,),
            backends=("fastclip", "fastclip-torch", "numpy", "torch-foreach", "torch-loop"),
            inplace=inplace,
            repeat=1,
        )
    )
    for r in report["results"]:
        if r["backend"] == "torch-loop" and r["kind"] == "rows":
            assert r["status"] == "n/a"
        else:
            assert r["status"] == "ok", r
            assert r["median_s"] > 0 and r["first_call_s"] > 0 and r["floor_fraction"] > 0


def test_many_arrays_and_16_bit() -> None:
    pytest.importorskip("torch")
    report = run(
        _cfg(
            workloads=("tiny",),
            backends=("fastclip", "fastclip-torch", "numpy"),
            dtypes=("float16", "bfloat16"),
            repeat=1,
        )
    )
    by = {(r["backend"], r["dtype"]): r for r in report["results"]}
    assert by[("fastclip", "bfloat16")]["status"] == "n/a"  # NumPy has no bfloat16
    assert by[("fastclip-torch", "bfloat16")]["status"] == "ok"
    assert by[("fastclip", "float16")]["status"] == "ok"


def test_inplace_leaves_base_and_out_of_place_leaves_inputs() -> None:
    (case,) = cases_for("single", (1000,), False)
    d = CaseData(case, "float32")
    before = d.np_base.copy()  # type: ignore[union-attr]
    op = bb.BACKENDS["numpy"].make(d, False)
    out = op()
    np.testing.assert_array_equal(d.numpy_arrays()[0], before)
    assert d.check(out, "peer")[1]


# ---------------------------------------------------------------- JSON, compare, plot


SCHEMA_KEYS = {
    "schema",
    "created",
    "command",
    "config",
    "machine",
    "bandwidth",
    "load_average",
    "skipped_backends",
    "results",
    "wall_s",
}
RESULT_KEYS = {
    "workload",
    "case",
    "kind",
    "size",
    "n_arrays",
    "dtype",
    "nbytes",
    "inplace",
    "backend",
    "role",
    "device",
    "status",
    "median_s",
    "q25_s",
    "q75_s",
    "min_s",
    "max_s",
    "samples_s",
    "inner",
    "first_call_s",
    "max_rel_err",
    "tolerance",
    "gbps",
    "floor_s",
    "floor_fraction",
    "speedup",
}


def test_json_schema(tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.json"  # type: ignore[operator]
    assert (
        main(
            [
                "bench",
                "--workloads",
                "single,tiny",
                "--sizes",
                "1e3",
                "--repeat",
                "2",
                "--backends",
                "fastclip,numpy",
                "--json",
                str(path),
                "--quiet",
            ]
        )
        == 0
    )
    data = json.loads(path.read_text())
    assert SCHEMA_KEYS <= set(data)
    assert data["schema"] == "fastclip-bench/1"
    m = data["machine"]
    for key in ("cpu_model", "cpu_count", "gpus", "versions", "numba_threads"):
        assert key in m
    assert m["versions"]["numpy"] == np.__version__
    assert data["bandwidth"]["cpu"]["bytes_per_s"] > 0
    assert "prange" in data["bandwidth"]["cpu"]["method"]
    assert len(data["results"]) == 4
    for r in data["results"]:
        assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
        assert len(r["samples_s"]) == 2
        assert r["q25_s"] <= r["median_s"] <= r["q75_s"]
        assert set(r["speedup"]) == {"numpy"}
    out = capsys.readouterr().out
    assert "x numpy" in out and "tiny 2000x1000" in out


def test_json_non_finite_is_strict(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "x.json"  # type: ignore[operator]
    write_json({"schema": "fastclip-bench/1", "results": [{"max_rel_err": math.inf}]}, path)
    text = path.read_text()
    assert "Infinity" not in text and '"inf"' in text
    assert load_json(path)["results"][0]["max_rel_err"] == "inf"


def test_compare(tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.json"  # type: ignore[operator]
    args = [
        "bench",
        "--workloads",
        "single",
        "--sizes",
        "1e3,1e4",
        "--repeat",
        "1",
        "--backends",
        "fastclip,numpy",
        "--quiet",
    ]
    assert main([*args, "--json", str(old)]) == 0
    capsys.readouterr()
    new = tmp_path / "new.json"  # type: ignore[operator]
    assert main([*args, "--compare", str(old), "--json", str(new)]) == 0
    out = capsys.readouterr().out
    assert "Compared with" in out and "ratio" in out
    rows = json.loads(new.read_text())["compare"]["rows"]
    assert len(rows) == 4
    for r in rows:
        assert r["ratio"] == pytest.approx(r["old_s"] / r["new_s"])


def test_compare_function_handles_disjoint_runs() -> None:
    a = {
        "results": [
            {"case": "a", "dtype": "float32", "inplace": True, "backend": "x", "median_s": 1.0}
        ],
        "machine": {"cpu_model": "A", "cpu_count": 2},
    }
    b = {
        "results": [
            {"case": "b", "dtype": "float32", "inplace": True, "backend": "x", "median_s": 1.0}
        ],
        "machine": {"cpu_model": "B", "cpu_count": 2},
    }
    text, rows = compare(a, b)
    assert rows == [] and "No result in common" in text and "different machines" in text


def test_plot_written(tmp_path: pytest.TempPathFactory) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"  # type: ignore[operator]
    assert (
        main(
            [
                "bench",
                "--workloads",
                "single,tiny",
                "--sizes",
                "1e3,1e4",
                "--repeat",
                "1",
                "--backends",
                "fastclip,numpy",
                "--plot",
                str(png),
                "--quiet",
            ]
        )
        == 0
    )
    data = png.read_bytes()
    assert len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- progress


def test_progress_bar_lines() -> None:
    s = io.StringIO()
    p = Progress(2, s)
    p.update("ignored on a non-terminal")
    p.step("first")
    p.step("second")
    p.close()
    lines = s.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("[" + "#" * 24 + "] 2/2")


def test_progress_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "bench",
                "--workloads",
                "single",
                "--sizes",
                "1e3",
                "--repeat",
                "1",
                "--backends",
                "numpy",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "[" in captured.err and "single 1e3" in captured.err
    assert "#" not in captured.out.split("\n")[0]


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


def _run_small_case(case: object, backends: list) -> dict:  # type: ignore[type-arg]
    """One small case, float32, one round, with a 10 GB/s floor: rows by backend."""
    from fastclip._bench.runner import run_case

    rows = run_case(
        case,  # type: ignore[arg-type]
        "float32",
        backends,
        _cfg(repeat=1),
        {"cpu": {"bytes_per_s": 1e10}},
        lambda s: None,
    )
    return {r["backend"]: r for r in rows}


def test_adamw_workload_every_cpu_backend() -> None:
    pytest.importorskip("torch")

    names = ["fastclip", "fastclip-torch", "numpy", "torch-foreach", "torch-loop", "torch-fused"]
    usable = [bb.BACKENDS[n] for n in names]
    by = _run_small_case(_small_adamw_case(), usable)
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


def test_adamw_16_bit_is_na_and_fused_peer_only_runs_adamw() -> None:
    pytest.importorskip("torch")
    report = run(
        _cfg(workloads=("tiny",), backends=("fastclip", "torch-fused"), dtypes=("float32",))
    )
    (fused,) = [r for r in report["results"] if r["backend"] == "torch-fused"]
    assert fused["status"] == "n/a" and "adamw workload only" in fused["reason"]
    from fastclip._bench.runner import run_case

    (row,) = run_case(
        _small_adamw_case(),  # type: ignore[arg-type]
        "float16",
        [bb.BACKENDS["fastclip"]],
        _cfg(),
        {},
        lambda s: None,
    )
    assert row["status"] == "n/a" and "float32 and float64" in row["reason"]


def test_adamw_memory_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastclip._bench.runner as runner

    (case,) = cases_for("adamw", None, False)
    assert case.size == 124_439_808 and case.passes == 8
    monkeypatch.setattr(runner.os, "sysconf", lambda name: 1024 if "PAGES" in name else 4096)
    (row,) = runner.run_case(case, "float32", [bb.BACKENDS["fastclip"]], _cfg(), {}, lambda s: None)
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


def test_per_sample_workload_every_cpu_backend() -> None:
    pytest.importorskip("torch")

    names = ["fastclip", "fastclip-torch", "numpy", "torch-foreach", "torch-loop", "opacus"]
    usable = [bb.BACKENDS[n] for n in names if bb.BACKENDS[n].probe() is None]
    by = _run_small_case(_small_per_sample_case(), usable)
    assert by["torch-loop"]["status"] == "n/a"
    for name in ("fastclip", "fastclip-torch", "numpy", "torch-foreach", "opacus"):
        if name not in by:
            continue  # opacus not installed
        assert by[name]["status"] == "ok", by[name]
        assert by[name]["max_rel_err"] < 2e-6
    f = by["fastclip"]
    assert f["floor_s"] == pytest.approx(2 * f["nbytes"] / 1e10)
    (case,) = cases_for("per-sample", None, False)
    assert case.shapes[0] == (256, 784, 1024) and case.size == 256 * 1_068_810


def test_opacus_backend_only_runs_per_sample() -> None:
    pytest.importorskip("opacus")
    report = run(_cfg(backends=("fastclip", "opacus")))
    (row,) = [r for r in report["results"] if r["backend"] == "opacus"]
    assert row["status"] == "n/a" and "per-sample workload only" in row["reason"]
