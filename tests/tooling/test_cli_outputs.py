"""``fastclip bench``'s output options and the command line's edges.

--json and --plot are checked before anything is timed (exit 2, nothing
written); --from refuses the options that choose what to run and applies
--compare, --plot and --json to the saved run; a closed stdout (``| head``)
ends without a traceback; an unknown option prints its own command's usage.

No test here times a benchmark except the one tiny saved run of the module
fixture (one workload, one size, one round, NumPy only, a 1 MiB probe).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fastclip._bench
import fastclip._bench.runner
from fastclip.cli import main

# Every test here runs with the 1 MiB bandwidth probe of tests/conftest.py.
pytestmark = pytest.mark.usefixtures("small_probe")

_ENV = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any benchmark run fails the test: the errors must come before one."""

    def ran(*args: Any, **kw: Any) -> None:
        raise AssertionError("the benchmark ran before the arguments were checked")

    monkeypatch.setattr(fastclip._bench, "run", ran)
    monkeypatch.setattr(fastclip._bench.runner, "run", ran)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real --json run, as small as the bench allows."""
    from fastclip._bench import timing

    path = tmp_path_factory.mktemp("saved") / "run.json"
    argv = ["bench", "--workloads", "single", "--sizes", "1e3,1e4", "--repeat", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timing, "HOST_PROBE_BYTES", 2**20)
        assert main([*argv, "--backends", "numpy", "--json", str(path), "--quiet"]) == 0
    yield path


def _error(argv: list[str], capsys: pytest.CaptureFixture[str], usage: str) -> str:
    """The argparse error of ``argv``: exit 2, ``usage`` first, one error line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"usage: {usage} "), captured.err
    error_lines = [line for line in captured.err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and captured.err.endswith(error_lines[0] + "\n")
    return error_lines[0]


# ---------------------------------------------------------------- --json, --plot up front


def test_json_to_a_directory_is_refused_before_the_run(
    tmp_path: Path, no_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error(["bench", "--json", str(tmp_path)], capsys, "fastclip bench")
    assert f"--json: {tmp_path} is a directory; give a file name" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc")
def test_json_to_an_unwritable_place_is_refused_before_the_run(
    no_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # /proc takes no new files, for root too (os.access says writable there)
    err = _error(["bench", "--json", "/proc/fastclip-run.json"], capsys, "fastclip bench")
    assert "--json: cannot write /proc/fastclip-run.json: cannot create a file in /proc" in err
    assert not os.path.exists("/proc/fastclip-run.json")


def test_json_under_a_file_is_refused(
    tmp_path: Path, no_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "f.txt"
    f.write_text("x")
    err = _error(["bench", "--json", str(f / "run.json")], capsys, "fastclip bench")
    assert f"{f} is a file, not a directory" in err
    assert f.read_text() == "x" and sorted(tmp_path.iterdir()) == [f]


def test_the_writability_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    from fastclip._bench.report import path_error

    existing = tmp_path / "old.json"
    existing.write_text("keep")
    assert path_error(str(tmp_path / "new.json"), "--json") is None
    assert path_error(str(existing), "--json") is None
    assert sorted(tmp_path.iterdir()) == [existing] and existing.read_text() == "keep"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("run.txt", "--plot: matplotlib cannot write '.txt' files here; use one of: "),
        ("run", "has no extension; give one, e.g. "),
        ("run.", "has no extension; give one, e.g. "),
    ],
)
def test_plot_extension_is_checked_before_the_run(
    tmp_path: Path, name: str, message: str, no_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.backend_bases import FigureCanvasBase

    path = tmp_path / name
    err = _error(["bench", "--plot", str(path)], capsys, "fastclip bench")
    assert message in err
    if "no extension" in message:  # matplotlib would have written PATH.png instead
        assert f"e.g. {str(path).rstrip('.')}.png (formats: " in err
    assert "png" in err and "pdf" in err and "svg" in err
    listed = err.rsplit(": ", 1)[1].rstrip(")").split(", ")
    assert set(listed) <= set(FigureCanvasBase.get_supported_filetypes())
    assert list(tmp_path.iterdir()) == []


def test_every_listed_plot_format_is_written_by_matplotlib(tmp_path: Path) -> None:
    """The list is matplotlib's own, less what would fail at savefig: a format
    listed but not writable would fail after the run, the bug this prevents."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastclip._bench.report import plot_formats

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2], [3, 4], label="a")
    ax.legend()
    try:
        for ext in plot_formats():
            path = tmp_path / f"p.{ext}"
            fig.savefig(path)
            assert path.stat().st_size > 0, ext
    finally:
        plt.close(fig)


def test_plot_without_matplotlib_is_refused_up_front_with_from(
    saved_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    err = _error(["bench", "--from", str(saved_run), "--plot", "x.png"], capsys, "fastclip bench")
    assert "--plot needs matplotlib: pip install matplotlib" in err


def test_json_and_plot_on_one_file_is_refused(
    tmp_path: Path, no_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    p = str(tmp_path / "x.png")
    err = _error(["bench", "--json", p, "--plot", p], capsys, "fastclip bench")
    assert "--json and --plot both name" in err


def test_bad_output_in_a_subprocess_exits_2_at_once(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fastclip", "bench", "--json", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_ENV,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("fastclip bench: error: --json: ")


# ---------------------------------------------------------------- --from


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--workloads", "single"], "--workloads has"),
        (["--backends", "numpy"], "--backends has"),
        (["--dtypes", "float32"], "--dtypes has"),  # the default, given: still refused
        (["--sizes", "1e3"], "--sizes has"),
        (["--repeat", "7"], "--repeat has"),
        (["--rep", "3"], "--repeat has"),  # argparse's abbreviation, named in full
        (["--inplace"], "--inplace has"),
        (["--out-of-place"], "--out-of-place has"),
        (["--full"], "--full has"),
        (["--large"], "--large has"),
        (["--repeat", "3", "--full"], "--repeat, --full have"),
    ],
)
def test_from_refuses_what_to_run_options(
    saved_run: Path, extra: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error(["bench", "--from", str(saved_run), *extra], capsys, "fastclip bench")
    assert f"{named} no effect with --from: a saved run is shown as it was timed" in err


def test_from_applies_compare_and_json(
    saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--compare: the ratios of the two files' medians; --json: the saved run again."""
    saved = json.loads(saved_run.read_text())
    old = json.loads(saved_run.read_text())
    for r in old["results"]:
        if isinstance(r.get("median_s"), float):
            r["median_s"] *= 2.0
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    again = tmp_path / "again.json"
    argv = ["bench", "--from", str(saved_run), "--compare", str(old_path), "--json", str(again)]
    assert main([*argv, "--quiet"]) == 0  # --quiet: no progress bar, as asked
    out = capsys.readouterr().out
    assert f"Compared with {old_path}" in out
    written = json.loads(again.read_text())
    assert written["results"] == saved["results"] and written["config"] == saved["config"]
    rows = written["compare"]["rows"]
    timed = [r for r in saved["results"] if r.get("median_s")]
    assert len(rows) == len(timed) == 2
    old_by = {(r["case"], r["backend"]): r["median_s"] for r in old["results"]}
    for row, r in zip(rows, timed):
        assert row["new_s"] == r["median_s"]
        assert row["ratio"] == pytest.approx(old_by[(r["case"], r["backend"])] / r["median_s"])
        assert f"{row['ratio']:.2f}" in out


def test_from_with_plot_svg(saved_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    svg = tmp_path / "replot.svg"
    assert main(["bench", "--from", str(saved_run), "--plot", str(svg)]) == 0
    assert b"<svg" in svg.read_bytes()[:1000]


# ---------------------------------------------------------------- unknown options


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["info", "--bogus"], "fastclip info"),
        (["bench", "--bogus"], "fastclip bench"),
        (["bench", "--quiet", "--bogus", "x"], "fastclip bench"),
        (["warmup", "--bogus"], "fastclip warmup"),
        (["--bogus"], "fastclip"),
    ],
)
def test_unknown_option_prints_its_commands_usage(
    argv: list[str], usage: str, no_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error(argv, capsys, usage)
    unknown = " ".join(a for a in argv if a not in ("info", "bench", "warmup", "--quiet"))
    assert err == f"{usage}: error: unrecognized arguments: {unknown}"


# ---------------------------------------------------------------- a closed stdout


def _closed_stdout(argv: list[str]) -> tuple[int, str]:
    """Run ``python -m fastclip ARGV`` whose stdout's reader has gone before it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastclip", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_ENV,
    )
    with proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the only reader: every write of the child now fails (EPIPE)
        err = proc.stderr.read().decode()
        return proc.wait(timeout=120), err


@pytest.mark.parametrize("argv", [["info", "--json"]])
def test_info_into_a_closed_pipe_exits_1_without_a_traceback(argv: list[str]) -> None:
    code, err = _closed_stdout(argv)
    assert code == 1  # the recipe of Python's docs (signal, "Note on SIGPIPE")
    assert err == ""


def test_bench_from_into_a_closed_pipe_still_writes_its_json(
    saved_run: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again.json"
    code, err = _closed_stdout(["bench", "--from", str(saved_run), "--json", str(again)])
    assert code == 1 and "Traceback" not in err and "BrokenPipe" not in err
    assert err.strip() == f"wrote {again}"
    assert json.loads(again.read_text())["results"] == json.loads(saved_run.read_text())["results"]


def test_help_into_a_closed_pipe_has_no_traceback() -> None:
    code, err = _closed_stdout(["bench", "--help"])
    assert code in (0, 1) and err == ""  # argparse swallows the failed write itself
