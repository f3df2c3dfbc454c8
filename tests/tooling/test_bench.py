"""``fastclip._bench``: workloads, the correctness check, JSON, --compare, the plot.

This file owns the benchmark's single and many-array workloads, its check, JSON,
--compare, the plot and the progress bar; the adamw and per-sample workloads are in
test_bench_workloads.py.

Everything runs on tiny sizes with a 1 MiB bandwidth probe, so the file takes a
few seconds; the real figures come from ``fastclip bench`` itself.
"""

from __future__ import annotations

import io
import json
import math
import time
from typing import Any

import numpy as np
import pytest

from fastclip._bench import registry as bb
from fastclip._bench import run, timing
from fastclip._bench.data import CaseData
from fastclip._bench.progress import Progress
from fastclip._bench.report import compare, format_table, load_json, write_json
from fastclip._bench.workloads import WORKLOADS, cases_for, gpt2_shapes
from fastclip.cli import main

# Every test here runs with the 1 MiB bandwidth probe of tests/conftest.py.
pytestmark = pytest.mark.usefixtures("small_probe")


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
    assert len(tiny.shapes) == 500 and tiny.size == 500_000  # the quick suite's
    (tiny,) = cases_for("tiny", None, True)
    assert len(tiny.shapes) == 2000 and tiny.size == 2_000_000
    (mini,) = cases_for("adamw", None, False)
    (small,) = cases_for("adamw", None, True)
    assert (len(mini.shapes), mini.size) == (28, 11_024_384)
    assert (len(small.shapes), small.size) == (148, 124_439_808)
    assert [c.shapes[0][0] for f in (False, True) for c in cases_for("per-sample", None, f)] == [
        32,
        256,
    ]
    assert not WORKLOADS["gpt2-small"].in_quick and WORKLOADS["gpt2-mini"].in_quick
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


def test_wrong_backend_is_reported_failed(
    bench_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bb.BACKENDS, "wrong", _wrong_backend())
    report = run(bench_config(backends=("fastclip", "numpy", "wrong")))
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


def test_raising_backend_is_an_error_not_a_crash(
    bench_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(d: CaseData, inplace: bool) -> bb.Op:
        def op() -> None:
            raise RuntimeError("boom")

        return op

    monkeypatch.setitem(
        bb.BACKENDS,
        "boom",
        bb.Backend("boom", "peer", "cpu", "cpu", "host", "raises", lambda: None, make),
    )
    report = run(bench_config(backends=("numpy", "boom")))
    by = {r["backend"]: r for r in report["results"]}
    assert by["boom"]["status"] == "error" and "boom" in by["boom"]["reason"]


def test_not_implemented_is_skipped_with_reason(
    bench_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(d: CaseData, inplace: bool) -> bb.Op:
        def op() -> None:
            raise NotImplementedError("no GPU backend yet")

        return op

    monkeypatch.setitem(
        bb.BACKENDS,
        "gpu-ish",
        bb.Backend("gpu-ish", "fastclip", "cpu", "cpu", "host", "", lambda: None, make),
    )
    report = run(bench_config(backends=("gpu-ish",)))
    (r,) = report["results"]
    assert r["status"] == "skipped" and "no GPU backend yet" in r["reason"]


def test_gpu_backends_skipped_with_reason_without_gpu(bench_config: Any) -> None:
    if bb.gpu_storage() is not None:
        pytest.skip("a CUDA GPU is usable here")
    report = run(bench_config(backends=("fastclip", "fastclip-gpu", "torch-cuda-foreach", "cupy")))
    skipped = report["skipped_backends"]
    assert set(skipped) == {"fastclip-gpu", "torch-cuda-foreach", "cupy"}
    assert all(skipped.values())
    assert "fastclip-gpu" in format_table(report)


# ---------------------------------------------------------------- backends, dtypes, modes


@pytest.mark.parametrize("inplace", [True, False])
def test_all_kinds_all_cpu_backends(bench_config: Any, inplace: bool) -> None:
    pytest.importorskip("torch")
    report = run(
        bench_config(
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


def test_many_arrays_and_16_bit(bench_config: Any) -> None:
    pytest.importorskip("torch")
    report = run(
        bench_config(
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
    assert "x numpy" in out and "tiny 500x1000" in out  # the quick suite's size


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
    p = Progress(s)
    p.begin("single", cases=2, units=4)
    p.update("within the first case")  # a line of its own on a non-terminal
    p.tick("numpy")  # advances within the case: 1 of 8 sub-steps
    p.tick("a")
    p.tick("b")
    p.tick("c")
    p.tick("d")  # capped: never past the end of the current case
    p.step("first")
    p.step("second")
    p.begin("adamw", cases=1, units=1)
    p.note("next: a big case")
    p.step("done")
    p.close()
    lines = s.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("[" + "." * 24 + "] single 1/2   0%")
    assert lines[0].endswith("within the first case")
    assert lines[1].startswith("[" + "#" * 3 + "." * 21 + "] single 1/2  12%")
    assert "single 1/2  38%" in lines[3]
    assert "single 1/2  50%" in lines[4] and "single 1/2  50%" in lines[5]  # capped at 4/8
    assert lines[6].startswith("[" + "#" * 12 + "." * 12 + "] single 2/2  50%")
    assert lines[7].startswith("[" + "#" * 24 + "] single 2/2 100%")
    assert lines[8] == "next: a big case"
    assert lines[9].startswith("[" + "#" * 24 + "] adamw 1/1 100%")
    assert all(len(line) <= 120 for line in lines)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_keeps_one_finished_bar_per_workload() -> None:
    s = _Tty()
    p = Progress(s)
    p.begin("single", cases=1, units=2)
    p.tick("numpy")
    p.step("single 1e3")
    p.begin("rows", cases=1)
    p.step("rows 1e3")
    p.close()
    lines = s.getvalue().split("\n")
    # each workload's bar is redrawn in place (\r) and left on its own line when done
    assert len(lines) == 3 and lines[2] == ""
    assert lines[0].rsplit("\r", 1)[1].startswith("[" + "#" * 24 + "] single 1/1 100%")
    assert lines[1].rsplit("\r", 1)[1].startswith("[" + "#" * 24 + "] rows 1/1 100%")


def test_big_cases_announce_their_memory_and_time() -> None:
    from fastclip._bench import registry
    from fastclip._bench.runner import BenchConfig, estimate
    from fastclip._bench.workloads import cases_for

    numpy_only = [registry.BACKENDS["numpy"]]
    bw = {"cpu": {"bytes_per_s": 10e9}}
    small = cases_for("single", (10**6,), False)[0]
    assert estimate(small, "float32", numpy_only, BenchConfig(), bw) is None
    big = cases_for("single", (10**8,), False)[0]
    line = estimate(big, "float32", numpy_only, BenchConfig(repeat=7), bw)
    # six copies of 400 MB; one backend, 3 passes at 10 GB/s, 7 rounds + 3 calls
    assert line == (
        f"next: single 1e8 float32: ~{6 * 4e8 / 2**30:.1f} GiB of memory, "
        f"at least {3 * 4e8 / 10e9 * 10:.0f} s (1 CPU backends)"
    )


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


def test_table_fits_120_columns_and_the_legend_explains_every_column(bench_config: Any) -> None:
    from fastclip._bench.report import _COLS

    names = ("fastclip", "numpy", "torch-foreach", "torch-loop")
    report = run(bench_config(workloads=("single", "tiny"), backends=names))
    text = format_table(report)
    assert max(map(len, text.splitlines())) <= 120, text
    legend = text.split("\n\n", 1)[0]
    assert "median of 2 interleaved rounds" in legend
    for name, _, _ in _COLS[4:]:  # workload, dtype, backend need no words; median above
        assert f"{name} =" in legend, name
    # the speedups below the table, one small table per case, only its peers
    assert "single 1e3 float32" in text and "x torch-foreach" in text


def test_from_a_saved_run_prints_its_table_and_plot(
    tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--from RUN.json`` times nothing: the saved run's table, and its plot."""
    path = tmp_path / "run.json"  # type: ignore[operator]
    args = ["bench", "--workloads", "single", "--sizes", "1e3,1e4", "--repeat", "2"]
    assert main([*args, "--backends", "fastclip,numpy", "--json", str(path), "--quiet"]) == 0
    first = capsys.readouterr().out
    png = tmp_path / "replot.png"  # type: ignore[operator]
    pytest.importorskip("matplotlib")
    assert main(["bench", "--from", str(path), "--plot", str(png)]) == 0
    again = capsys.readouterr().out
    assert again.strip() == first.strip()  # the same table, from the file
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
