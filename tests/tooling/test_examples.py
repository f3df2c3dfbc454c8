"""Run every script of docs/examples/ on tiny sizes, in subprocesses (as a user would).

This file owns docs/examples/; the API reference is in test_docs.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "docs", "examples")


def run(script: str, *args: str, cwd: str = ROOT, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    return proc.stdout


def test_numpy_mlp_sgd_learns() -> None:
    out = run("numpy_mlp_sgd.py", "--tiny")
    m = re.search(
        r"loss: start ([\d.]+), clipped SGD ([\d.]+), fused clip\+momentum SGD ([\d.]+)", out
    )
    assert m, out
    start, plain, fused = map(float, m.groups())
    assert plain < 0.6 * start and fused < 0.6 * start


def test_torch_zclip_adamw_clips_injected_spikes() -> None:
    pytest.importorskip("torch")
    out = run("torch_zclip_adamw.py", "--tiny")
    spikes = [line for line in out.splitlines() if line.startswith(("step   20", "step   30"))]
    assert len(spikes) == 2 and all("clipped to" in s for s in spikes), out
    m = re.search(r"loss: first ([\d.]+), last ([\d.]+)", out)
    assert m and float(m.group(2)) < float(m.group(1)), out


def test_adaptive_traces_table() -> None:
    out = run("adaptive_traces.py", "--tiny")
    rows = {line[:18].strip(): line.split() for line in out.splitlines()[1:5]}
    assert set(rows) == {"none", "global norm 1.0", "AutoClip p=10", "ZClip"}
    assert int(rows["none"][-2]) == 0  # nothing clipped without a clipper
    assert int(rows["AutoClip p=10"][-2]) > 0


def test_adaptive_traces_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "traces.png"
    out = run("adaptive_traces.py", "--steps", "30", "--out", str(out_png))
    assert "wrote" in out and out_png.stat().st_size > 10_000


def test_adaptive_traces_default_output_is_the_temporary_folder(tmp_path) -> None:
    """Without --out the PNG goes to the temporary folder, never the current one
    (running the example must not dirty a checkout); every clipper's clipped
    steps are counted, ZClip's too."""
    pytest.importorskip("matplotlib")
    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    out = run("adaptive_traces.py", "--steps", "120", cwd=str(work), env=env)
    assert list(work.iterdir()) == []
    assert (tmp / "adaptive_traces.png").stat().st_size > 10_000
    rows = {line[:18].strip(): line.split() for line in out.splitlines()[1:5]}
    assert int(rows["ZClip"][-2]) > 0  # ZClip clipped the corrupted batches
