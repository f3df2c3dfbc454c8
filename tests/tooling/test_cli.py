"""The ``fastclip`` command line: help, argument errors (exit 2), ``info``.

This file owns the command line; the benchmark it runs is in test_bench.py and
test_bench_workloads.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastclip.cli import _parse_size, main

# Every test here runs with the 1 MiB bandwidth probe of tests/conftest.py.
pytestmark = pytest.mark.usefixtures("small_probe")


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fastclip" in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--workloads", "gpt5"], "unknown workload 'gpt5'; choose from: single"),
        (["bench", "--workloads", "single,nope"], "unknown workload 'nope'"),
        (["bench", "--backends", "jaxx"], "unknown backend 'jaxx'; choose from: fastclip"),
        (["bench", "--dtypes", "float8"], "unknown dtype 'float8'"),
        (["bench", "--sizes", "abc"], "--sizes: 'abc' is not a number"),
        (["bench", "--sizes", "1e3,0"], "sizes must be at least 1"),
        (["bench", "--sizes", "-5"], "sizes must be at least 1"),
        (["bench", "--sizes", "1.5"], "not a whole number"),
        (["bench", "--sizes", "1e12"], "not supported"),
        (["bench", "--sizes", ","], "--sizes is empty"),
        (["bench", "--workloads", "tiny", "--sizes", "1e3"], "--sizes applies to the sized"),
        (["bench", "--repeat", "0"], "--repeat must be at least 1"),
        (["bench", "--repeat", "x"], "invalid int value"),
        (["bench", "--inplace", "--out-of-place"], "not allowed with argument"),
        (["bench", "--compare", "/nonexistent/old.json"], "--compare: cannot read"),
        (["bench", "--json", "/nonexistent/dir/x.json"], "directory /nonexistent/dir does not"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_argument_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(argv, capsys)
    assert message in err
    if argv[0] == "bench":  # the bench's own usage, whose options the error is about
        assert err.startswith("usage: fastclip bench ")


def test_compare_rejects_other_json(
    tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "other.json"  # type: ignore[operator]
    p.write_text('{"hello": 1}')
    assert "not a fastclip bench JSON file" in _error(["bench", "--compare", str(p)], capsys)


def test_plot_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fastclip._bench.plot as plot

    def missing() -> None:
        raise ImportError(plot.INSTALL_HINT)

    monkeypatch.setattr(plot, "check_available", missing)
    err = _error(["bench", "--plot", "x.png"], capsys)
    assert "pip install matplotlib" in err


def test_parse_size() -> None:
    assert _parse_size("1e6") == 1_000_000
    assert _parse_size("1_000") == 1000
    assert _parse_size(" 42 ") == 42


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["info", "--help"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fastclip" in out
    if argv[0] == "bench":
        for word in (
            "--workloads",
            "--backends",
            "--dtypes",
            "--sizes",
            "--repeat",
            "--out-of-place",
            "--json",
            "--compare",
            "--plot",
            "gpt2-small",
            "torch-foreach",
            "bandwidth floor",
            "examples:",
        ):
            assert word in out, word


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "bench" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import fastclip

    with pytest.raises(SystemExit):
        main(["--version"])
    assert fastclip.__version__ in capsys.readouterr().out


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numba_threading_layer" in out and "numpy.ndarray" in out and "gpus" in out


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["routes"]["numpy.ndarray"] == "numba-cpu"


def test_python_m_fastclip_info() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastclip", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fastclip:" in proc.stdout and "routes:" in proc.stdout


def test_python_m_fastclip_bad_argument_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastclip", "bench", "--workloads", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert "unknown workload 'nope'" in proc.stderr and proc.stdout == ""
