"""A new process's first call compiles or loads only what it needs.

This file owns the first-call cost (how much is compiled, loaded and imported
by the first call of a process); the cache's folder, safety and concurrent
writers are in tests/routes/test_numba_cache.py, ``fastclip warmup`` in
test_warmup.py.  Wall-clock targets cannot be asserted on a shared machine
(``benchmarks/bench_first_call.py`` measures them); these tests assert their
deterministic causes, in fresh processes on a fresh ``NUMBA_CACHE_DIR``:

* a cold first ``clip_by_global_norm_`` of a list above the parallel
  threshold compiles the serial twin of one table kernel and nothing else
  that is cached (no parallel twin, no bulk header kernel);
* a warm first call compiles nothing and does not import numba's lowering
  registries (``numba.np.arraymath``, which imports ``scipy.linalg``);
* the bulk header kernel is compiled once a process has made
  ``OPTIONAL_KERNEL_AFTER_CALLS`` list calls, and a later process loads it
  at its first call.

Every result is checked against the float64 NumPy oracle of tests/reference.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reference as ref

REPO = Path(__file__).resolve().parents[2]
MAX_NORM = 1.0

CHILD = r"""
import gc, json, sys
import numpy as np
import fastclip
from fastclip import _config

def lists(n):
    rng = np.random.default_rng(n)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(10)]

first = lists(SIZE)
norm = float(fastclip.clip_by_global_norm_(first, MAX_NORM))
arraymath = "numba.np.arraymath" in sys.modules
for _ in range(EXTRA):  # small lists: below the parallel threshold
    fastclip.clip_by_global_norm_(lists(100), MAX_NORM)

from numba.core.dispatcher import Dispatcher
from fastclip._cpu import _build

kernels = {}
for d in gc.get_objects():
    if isinstance(d, Dispatcher) and isinstance(d._cache, _build._CheckedCache):
        kernels[d.py_func.__qualname__] = [
            sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values())
        ]
print(json.dumps({
    "norm": norm,
    "arrays": [a.astype(float).tolist() for a in first],
    "inputs": [a.astype(float).tolist() for a in lists(SIZE)],
    "kernels": kernels,
    "arraymath": arraymath,
    "after": _config.OPTIONAL_KERNEL_AFTER_CALLS,
}))
"""


def _run(cache: Path, size: int, extra: int = 0) -> dict[str, Any]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    script = CHILD.replace("SIZE", str(size)).replace("EXTRA", str(extra))
    script = script.replace("MAX_NORM", repr(MAX_NORM))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    inputs = [np.array(a, np.float32) for a in out["inputs"]]
    expected, total = ref.clip_by_global_norm(inputs, MAX_NORM)
    assert out["norm"] == pytest.approx(float(total), rel=1e-6)
    for got, want in zip(out["arrays"], expected):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    return out


def _indexed(cache: Path) -> set[str]:
    """The kernels with an index in the cache (``<module>.<qualname>-<line>.pyXY.nbi``)."""
    return {p.name.split(".")[1].split("-")[0] for p in cache.rglob("*.nbi")}


def test_first_calls_compile_and_load_only_what_they_need(tmp_path: Path) -> None:
    from fastclip import _config

    cache = tmp_path / "cache"
    big = _config.PARALLEL_MIN_ELEMENTS // 10 + 1  # ten arrays: above the threshold

    cold = _run(cache, big)
    # the first launch of a size class runs serially: the parallel twin is not
    # built, nor the optional bulk header kernel (10 arrays >= FAST_HEADERS_MIN_ARRAYS)
    assert _indexed(cache) == {"tab_clip_ser"}
    assert cold["kernels"]["tab_clip_ser"] == [0, 1]

    warm = _run(cache, big, extra=cold["after"])
    assert warm["kernels"]["tab_clip_ser"] == [1, 0]  # loaded, not compiled
    assert not warm["arraymath"]  # numba's lowering registries were not imported
    # the list calls after the first took the Python header read until they had
    # made OPTIONAL_KERNEL_AFTER_CALLS calls; then the kernel was compiled
    assert warm["kernels"]["numpy_headers_ser"] == [0, 1]
    assert "numpy_headers_ser" in _indexed(cache)

    later = _run(cache, big)  # the first call of a later process loads it
    assert later["kernels"]["numpy_headers_ser"] == [1, 0]
    assert later["kernels"]["tab_clip_ser"] == [1, 0]
    assert not later["arraymath"]
