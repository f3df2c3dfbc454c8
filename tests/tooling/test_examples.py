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


def run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
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
