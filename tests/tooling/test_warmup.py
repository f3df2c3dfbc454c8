"""``fastclip warmup``: the kernels it compiles are the ones later calls load.

This file owns the warmup command; numba's cache itself is in
tests/routes/test_numba_cache.py.  Each test runs fresh processes on a fresh
``NUMBA_CACHE_DIR``: after ``fastclip warmup``, a new process's first calls
add no file to the cache (they loaded every kernel instead of compiling it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "NUMBA_CACHE_DIR": str(cache)}


def _cache_files(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}


def test_warmup_fills_the_cache_that_first_calls_load(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "fastclip", "warmup", "--dtypes", "float32", "--ops", "norm,clip"],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(cache),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("norm        float32") and lines[1].startswith("clip ")
    assert "numba cache: on, in " + str(cache) in lines[-1]
    before = _cache_files(cache)
    assert any(f.endswith(".nbi") for f in before)
    # the optional bulk header kernel, which first calls do not compile, is cached too
    assert any("numpy_headers_ser" in f and f.endswith(".nbi") for f in before)
    quick_start = (
        "import numpy as np, fastclip\n"
        "for n in (1000, 200_000):\n"
        "    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)\n"
        "    fastclip.norm(x); fastclip.clip_by_norm_(x, 1.0)\n"
        "    fastclip.clip_by_global_norm_([x, x.copy()], 1.0)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", quick_start],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(cache),
    )
    assert run.returncode == 0, run.stderr
    assert _cache_files(cache) == before  # nothing compiled: every kernel was loaded


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtypes", "float8"], "unknown dtype 'float8'"),
        (["--ops", "norm,nope"], "unknown operation 'nope'"),
    ],
)
def test_warmup_argument_errors(args: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fastclip", "warmup", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path),
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: fastclip warmup") and message in proc.stderr


def test_warmup_caches_the_distributed_and_spam_kernels(tmp_path: Path) -> None:
    """``--ops distributed,spam``: a new process's float64-accumulated local norm and
    fused SPAM / Stable-SPAM steps then load every kernel (no file added), and the
    norm is the float64 oracle's."""
    pytest.importorskip("torch", reason="the spam group steps torch optimizers")
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "fastclip", "warmup", "--dtypes", "float32", "--ops",
         "distributed,spam"],
        capture_output=True, text=True, timeout=600, env=_env(cache),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("distributed float32") and lines[1].startswith("spam ")
    before = _cache_files(cache)
    assert any("tab_pow_sum_wide_ser" in f for f in before)
    assert any("tab_pow_sum_wide_par" in f for f in before)
    script = (
        "import math, numpy as np, torch\n"
        "from fastclip.distributed import _local\n"
        "from fastclip.torch import SPAMAdamW, StableSPAMAdamW\n"
        "for n in (1000, 200_000):\n"
        "    xs = [np.random.default_rng(0).standard_normal(n).astype(np.float32)] * 2\n"
        "    ref = math.sqrt(2 * math.fsum(xs[0].astype(np.float64) ** 2))\n"
        "    assert abs(_local.local_norm(xs, 2, 2.0) - ref) <= 1e-13 * ref\n"
        "    ps = [torch.nn.Parameter(torch.zeros(n)) for _ in range(2)]\n"
        "    for p in ps: p.grad = torch.ones(n)\n"
        "    for opt in (SPAMAdamW(ps, fused=True), StableSPAMAdamW(ps, fused=True),\n"
        "                StableSPAMAdamW(ps, amsgrad=True, fused=True)):\n"
        "        opt.step(); opt.step()\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        env=_env(cache),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert _cache_files(cache) == before  # nothing compiled: every kernel was loaded
