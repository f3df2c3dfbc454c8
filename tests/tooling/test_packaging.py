"""The distribution: sdist and wheel build, pass ``twine check``, and the wheel
works from a fresh virtualenv (``fastclip info`` and a clip there).

This file owns packaging; the CLI itself is in test_cli.py.  The name is
``fastclip-ml``: PyPI's ``fastclip`` is an unrelated project.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="build is not installed (the 'test' extra)")
    out = tmp_path_factory.mktemp("dist")
    # no isolation: setuptools from this environment, nothing downloaded
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def test_sdist_and_wheel_pass_twine_check(dist: Path) -> None:
    pytest.importorskip("twine", reason="twine is not installed (the 'test' extra)")
    files = sorted(p.name for p in dist.iterdir())
    assert any(f.startswith("fastclip_ml-") and f.endswith(".tar.gz") for f in files), files
    assert any(f.startswith("fastclip_ml-") and f.endswith(".whl") for f in files), files
    proc = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_wheel_holds_the_cuda_sources_and_py_typed(dist: Path) -> None:
    wheel = next(dist.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fastclip/py.typed" in names
    cu = {n for n in names if n.endswith(".cu")}
    sources = {f"fastclip/_gpu/{p.name}" for p in (ROOT / "fastclip" / "_gpu").glob("*.cu")}
    assert cu == sources and sources
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)


def test_wheel_works_in_a_fresh_virtualenv(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "nbcache")
    info = subprocess.run(
        [str(venv / "bin" / "fastclip"), "info"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the checkout: the installed package, nothing else
        env=env,
    )
    assert info.returncode == 0, info.stderr
    assert "numpy.ndarray                    numba-cpu" in info.stdout
    code = (
        "import fastclip, numpy as np; "
        "x = np.array([3.0, 4.0]); n = fastclip.clip_by_norm_(x, 1.0, eps=0.0); "
        "print(fastclip.__file__); print(float(n), *x.tolist())"
    )
    run = subprocess.run(
        [str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert run.returncode == 0, run.stderr
    where, result = run.stdout.splitlines()
    assert str(venv) in where  # the wheel's copy, not the checkout
    norm, *clipped = map(float, result.split())
    assert norm == 5.0
    assert clipped == pytest.approx([0.6, 0.8], rel=1e-15)
