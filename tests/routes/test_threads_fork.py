"""Concurrency: several Python threads at once under each numba threading layer, and fork().

Each case runs in a fresh interpreter (the layer is chosen per process, and a
crash such as workqueue's abort must not take the test run down with it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TIMEOUT = 300
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["workqueue", "omp"]

PRELUDE = f"""
import json, os, sys, threading
import numpy as np
sys.path.insert(0, {TESTS_DIR!r})
import reference as ref
import fastclip
import fastclip._config as cfg

N = 3 * cfg.PARALLEL_MIN_ELEMENTS + 17  # large enough for the parallel kernels
rng = np.random.default_rng(0)

def close(got, expected):
    return np.allclose(np.asarray(got, np.float64), expected, rtol=1e-6, atol=0)
"""

THREADS = (
    PRELUDE
    + """
bases = [[rng.standard_normal(N).astype(np.float32) for _ in range(2)] for _ in range(4)]
expected = [ref.clip_by_global_norm(b, 50.0 + k) for k, b in enumerate(bases)]
errors = []

def worker(k):
    try:
        for i in range(10):
            xs = [b.copy() for b in bases[k]]
            total = fastclip.clip_by_global_norm_(xs, 50.0 + k)
            outs, want_total = expected[k]
            if not close(total, want_total) or not all(close(x, o) for x, o in zip(xs, outs)):
                errors.append(f"thread {k} call {i}: wrong result")
    except Exception as exc:  # reported to the parent through stdout
        errors.append(f"thread {k}: {exc!r}")

threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
import numba
print(json.dumps({"layer": numba.threading_layer(), "errors": errors}))
"""
)

FORK = (
    PRELUDE
    + """
x = rng.standard_normal(N).astype(np.float32)
want_x = ref.clip_by_norm(x, 10.0)
cfg.THREADS = "parallel"  # the parent runs parallel kernels first (no auto serial probe)
assert close(fastclip.clip_by_norm(x, 10.0), want_x)
fastclip.clip_by_global_norm_([x, x[:0]], 10.0)
cfg.THREADS = "auto"  # the child runs under the default policy
y = rng.standard_normal(N).astype(np.float32)
want_y, want_total = ref.clip_by_global_norm([y, y[:5].copy()], 3.0)
pid = os.fork()
if pid == 0:
    ok = False
    try:
        ys = [y, y[:5].copy()]
        total = fastclip.clip_by_global_norm_(ys, 3.0)
        ok = close(total, want_total) and close(ys[0], want_y[0]) and close(ys[1], want_y[1])
        from fastclip._cpu import _launch  # the rule, as documented: serial only under omp
        ok = ok and ("serial only" in _launch.policy()) == (_launch.threading_layer() == "omp")
    finally:
        os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
import numba
print(json.dumps({"layer": numba.threading_layer(), "child": os.waitstatus_to_exitcode(status),
                  "parent_ok": bool(close(x, want_x))}))
"""
)


def _run(code: str, layer: str) -> dict:
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layer", LAYERS)
def test_threads_clip_concurrently(layer):
    report = _run(THREADS, layer)
    assert report["layer"] == layer
    assert report["errors"] == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available on this platform")
@pytest.mark.parametrize("layer", LAYERS)
def test_fork_after_a_parallel_kernel(layer):
    report = _run(FORK, layer)
    assert report["layer"] == layer
    assert report["parent_ok"]
    assert report["child"] == 0
