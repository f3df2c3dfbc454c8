"""First-call cost of the README's NumPy quick start: cold cache, warm cache, steady state.

Each round starts fresh processes, in this order:

1. ``import numba`` alone (the floor every numba library pays);
2. *cold*: the quick start on an empty temporary ``NUMBA_CACHE_DIR`` (every
   kernel it needs is compiled and written to the cache);
3. *warm*: the quick start again in a new process on that cache (kernels are
   loaded), then the first call repeated to give its steady-state time.

Printed: medians (and the spread, min-max) over the rounds of the import
time, the first call (``clip_by_global_norm_`` of ten 768 x 768 float32
arrays) in wall-clock and CPU seconds, the whole quick start, and the warm
"import + first call" minus ``import numba``.  CPU seconds move less than wall
seconds when other processes share the machine; the rounds interleave the
three kinds so that a busy spell hits all of them.

    python benchmarks/bench_first_call.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NUMBA_ONLY = r"""
import json, time
t0, c0 = time.perf_counter(), time.process_time()
import numba
print(json.dumps({"import": time.perf_counter() - t0, "import_cpu": time.process_time() - c0}))
"""

QUICK_START = r"""
import json, time
t0, c0 = time.perf_counter(), time.process_time()
import numpy as np, fastclip
t_import, c_import = time.perf_counter() - t0, time.process_time() - c0

grads = [np.random.randn(768, 768).astype(np.float32) for _ in range(10)]
from numba.core import event

compiled = []  # functions numba compiles (kernels, their helpers and overloads)
listener = type("L", (event.Listener,), {
    "on_start": lambda self, ev: compiled.append(1), "on_end": lambda self, ev: None})()
w0, c0 = time.perf_counter(), time.process_time()
with event.install_listener("numba:compile", listener):
    total = fastclip.clip_by_global_norm_(grads, max_norm=1.0)   # the first call
w1, c1 = time.perf_counter(), time.process_time()
first_compiles = len(compiled)
fastclip.global_norm(grads)
w = np.random.randn(256, 128).astype(np.float32)
fastclip.clip_by_value_(w, -0.01, 0.01)
fastclip.clip_by_norm_(w, 3.0, axis=0)
per_sample = fastclip.clip_by_norm(np.random.randn(32, 1000), 1.0, axis=1)
w2 = time.perf_counter()
steady = []
if STEADY:
    for _ in range(STEADY):
        s = time.perf_counter()
        fastclip.clip_by_global_norm_(grads, max_norm=1.0)
        steady.append(time.perf_counter() - s)
print(json.dumps({
    "import": t_import,
    "import_cpu": c_import,
    "first": w1 - w0,
    "first_cpu": c1 - c0,
    "quick_start": w2 - w0,
    "compiles": first_compiles,
    "steady": sorted(steady)[len(steady) // 2] if steady else None,
}))
"""


def _child(code: str, cache: str | None, repo: Path = REPO) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("NUMBA_CACHE_DIR", None)
    if cache is not None:
        env["NUMBA_CACHE_DIR"] = cache
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tempfile.gettempdir(),  # not a checkout: ``-c`` puts the cwd first on sys.path
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _fmt(values: list[float], unit: float = 1.0, digits: int = 3) -> str:
    v = [x * unit for x in values]
    if all(float(x).is_integer() for x in v):
        digits = 0
    return f"{statistics.median(v):.{digits}f}  ({min(v):.{digits}f}-{max(v):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="fresh-process rounds (5)")
    parser.add_argument("--steady", type=int, default=50, help="steady-state calls (50)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (a folder holding fastclip/) measured in the same rounds",
    )
    args = parser.parse_args()

    rows: dict[str, list[float]] = {}

    def add(key: str, value: float | None) -> None:
        if value is not None:
            rows.setdefault(key, []).append(value)

    for r in range(args.rounds):
        numba_only = _child(NUMBA_ONLY, None)
        with tempfile.TemporaryDirectory(prefix="fastclip-first-call-") as cache:
            cold = _child(QUICK_START.replace("STEADY", "0"), cache)
            warm = _child(QUICK_START.replace("STEADY", str(args.steady)), cache)
        add("import numba", numba_only["import"])
        add("import numba (CPU)", numba_only["import_cpu"])
        add("cold: import fastclip", cold["import"])
        add("cold: first call (wall)", cold["first"])
        add("cold: first call (CPU)", cold["first_cpu"])
        add("cold: whole quick start", cold["quick_start"])
        add("warm: import fastclip", warm["import"])
        add("warm: first call (wall)", warm["first"])
        add("warm: first call (CPU)", warm["first_cpu"])
        add("warm: whole quick start", warm["quick_start"])
        add(
            "warm: import + first call - import numba",
            warm["import"] + warm["first"] - numba_only["import"],
        )
        add(
            "warm: the same in CPU seconds",
            warm["import_cpu"] + warm["first_cpu"] - numba_only["import_cpu"],
        )
        add("steady: clip_by_global_norm_ (ms)", warm["steady"] * 1e3)
        add("cold: functions compiled by the first call", cold["compiles"])
        add("warm: functions compiled by the first call", warm["compiles"])
        if args.baseline is not None:
            with tempfile.TemporaryDirectory(prefix="fastclip-first-call-") as cache:
                base = _child(QUICK_START.replace("STEADY", "0"), cache, args.baseline)
                base_warm = _child(QUICK_START.replace("STEADY", "0"), cache, args.baseline)
            add("baseline cold: first call (wall)", base["first"])
            add("baseline cold: first call (CPU)", base["first_cpu"])
            add("baseline cold: functions compiled", base["compiles"])
            add("baseline warm: first call (wall)", base_warm["first"])
            add("baseline warm: first call (CPU)", base_warm["first_cpu"])
            add(
                "baseline warm: import + first call - import numba",
                base_warm["import"] + base_warm["first"] - numba_only["import"],
            )
            add(
                "baseline warm: the same in CPU seconds",
                base_warm["import_cpu"] + base_warm["first_cpu"] - numba_only["import_cpu"],
            )
        print(
            f"round {r + 1}/{args.rounds}: cold first call {cold['first']:.2f} s, "
            f"warm {warm['first']:.3f} s",
            file=sys.stderr,
        )

    print(f"fastclip first call, README quick start; medians (min-max) of {args.rounds} rounds")
    print(f"{'':<50} seconds")
    for key, values in rows.items():
        print(f"{key:<50} {_fmt(values)}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (2 cores here)")


if __name__ == "__main__":
    main()
