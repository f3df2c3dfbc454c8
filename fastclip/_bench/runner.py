"""Run a benchmark: resolve the selection, measure the floor, time every case."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import numpy as np

from . import registry, timing
from .data import DTYPES, CaseData, Unsupported
from .machine import describe
from .progress import Progress
from .workloads import WORKLOADS, Case, cases_for

SCHEMA = "fastclip-bench/1"


@dataclass
class BenchConfig:
    workloads: tuple[str, ...] | None = None  # None: the default (quick or full) suite
    backends: tuple[str, ...] | None = None  # None: every backend (missing ones skipped)
    dtypes: tuple[str, ...] = ("float32",)
    sizes: tuple[int, ...] | None = None  # overrides the sized workloads' sizes
    repeat: int = 7
    inplace: bool = True
    large: bool = False
    full: bool = False
    progress: bool = True
    seed: int = 0
    argv: list[str] = field(default_factory=list)


def default_workloads(full: bool, large: bool, gpu: bool) -> tuple[str, ...]:
    return tuple(
        n for n, w in WORKLOADS.items() if (full or w.in_quick) and (not w.large or large or gpu)
    )


def _cases(cfg: BenchConfig, gpu: bool) -> list[Case]:
    names = cfg.workloads or default_workloads(cfg.full, cfg.large, gpu)
    out: list[Case] = []
    for n in names:
        out += cases_for(n, cfg.sizes, cfg.full)
    return out


def run(cfg: BenchConfig, stderr: TextIO | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; returns the JSON-ready report."""
    t_start = time.perf_counter()
    load_start = _loadavg()
    stderr = stderr if stderr is not None else sys.stderr
    known = registry.BACKENDS
    names = list(cfg.backends or known)
    for d in cfg.dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}")
    usable: list[registry.Backend] = []
    skipped: dict[str, str] = {}
    for n in names:
        b = known[n]
        why = b.probe()
        if why is None:
            usable.append(b)
        else:
            skipped[n] = why
    gpu = any(registry.device_of(b) == "cuda" for b in usable)
    cases = _cases(cfg, gpu)

    progress = Progress(stderr, cfg.progress)
    progress.begin("floor", 1)
    progress.update("measuring the bandwidth floor")
    bw: dict[str, Any] = {}
    if any(registry.device_of(b) == "cpu" for b in usable):
        bw["cpu"] = timing.host_bandwidth()
    if gpu:
        bw["cuda"] = timing.cuda_bandwidth()
    progress.step("bandwidth floor measured")

    results: list[dict[str, Any]] = []
    for workload, group in _by_workload(cases):
        units = _units(group[0], usable, cfg)
        progress.begin(workload, len(group) * len(cfg.dtypes), units)
        for case in group:
            for dtype in cfg.dtypes:
                msg = f"{case.label} {dtype}"
                need = estimate(case, dtype, usable, cfg, bw)
                if need is not None:
                    progress.note(need)
                progress.update(msg)
                tick = _ticker(progress, msg)
                if case.kind == "train":
                    results += _train_case(case, dtype, cfg, tick)
                else:
                    results += run_case(case, dtype, usable, cfg, bw, tick)
                progress.step(msg)
    if "cpu" in bw:  # measure again at the end; the floor uses every sample
        progress.begin("floor", 1)
        progress.update("measuring the bandwidth floor again")
        again = timing.host_bandwidth()
        bw["cpu"]["samples_s"] += again["samples_s"]
        import statistics

        med = statistics.median(bw["cpu"]["samples_s"])
        bw["cpu"]["median_s"] = med
        bw["cpu"]["bytes_per_s"] = 2 * timing.HOST_PROBE_BYTES / med
        _refloor(results, bw)
    progress.close()
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["fastclip", *cfg.argv],
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("argv", "progress")},
        "machine": describe([b.name for b in usable]),
        "bandwidth": bw,
        "load_average": {"start": load_start, "end": _loadavg()},
        "skipped_backends": skipped,
        "results": results,
        "wall_s": time.perf_counter() - t_start,
    }


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other processes running skew parallel timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _ticker(progress: Progress, prefix: str) -> Callable[[str], None]:
    return lambda s: progress.tick(f"{prefix}: {s}")


def _by_workload(cases: list[Case]) -> list[tuple[str, list[Case]]]:
    """Consecutive cases grouped by workload (``_cases`` lists them workload by workload)."""
    out: list[tuple[str, list[Case]]] = []
    for c in cases:
        if out and out[-1][0] == c.workload:
            out[-1][1].append(c)
        else:
            out.append((c.workload, [c]))
    return out


def _units(case: Case, usable: list[registry.Backend], cfg: BenchConfig) -> int:
    """Sub-steps of one case: each backend's check and first call, then each round."""
    if case.kind == "train":
        from .train import FORMS

        return len(FORMS) + cfg.repeat
    return len(usable) + cfg.repeat


#: Cases whose data passes this many bytes get their needs printed before they start.
ANNOUNCE_BYTES = 256 * 2**20


def estimate(
    case: Case, dtype: str, usable: list[registry.Backend], cfg: BenchConfig, bw: dict[str, Any]
) -> str | None:
    """A line saying the memory and time a big case needs, or None for small ones.

    Memory: ``adamw`` keeps every CPU backend's parameters and two moments (as
    ``_memory_shortfall`` counts); the other kinds hold the base values, one
    shared work pool, a float64 reference (two copies' worth), one output and a
    peer's temporary (NumPy's ``x * x``): about six copies of the data.  Time: a
    lower bound, every CPU backend at the bandwidth floor for its first call,
    the inner-loop calibration and ``repeat`` rounds of at least one call each.
    """
    item = 8 if dtype == "float64" else 2 if dtype in ("float16", "bfloat16") else 4
    nbytes = case.size * item
    if nbytes < ANNOUNCE_BYTES or case.kind == "train":
        return None
    host = sum(1 for b in usable if registry.device_of(b) == "cpu")
    copies = 3 * host + 4 if case.kind == "adamw" else 6
    line = f"next: {case.label} {dtype}: ~{nbytes * copies / 2**30:.1f} GiB of memory"
    probe = bw.get("cpu")
    if probe and host:
        per_call = case.passes * nbytes / probe["bytes_per_s"]
        line += f", at least {per_call * host * (cfg.repeat + 3):.0f} s ({host} CPU backends)"
    return line


def _record(
    case: Case, dtype: str, b: registry.Backend, nbytes: int, inplace: bool, status: str, **kw: Any
) -> dict[str, Any]:
    return {
        "workload": case.workload,
        "case": case.label,
        "kind": case.kind,
        "size": case.size,
        "n_arrays": len(case.shapes),
        "dtype": dtype,
        "nbytes": nbytes,
        "inplace": inplace,
        "backend": b.name,
        "role": b.role,
        "device": registry.device_of(b),
        "status": status,
        **kw,
    }


def run_case(
    case: Case,
    dtype: str,
    usable: list[registry.Backend],
    cfg: BenchConfig,
    bw: dict[str, Any],
    tick: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Check and time every usable backend on one case and dtype."""
    short = _memory_shortfall(case, dtype, usable)
    if short:
        return [_record(case, dtype, b, 0, cfg.inplace, "n/a", reason=short) for b in usable]
    try:
        data = CaseData(case, dtype, cfg.seed)
    except Unsupported as exc:
        return [_record(case, dtype, b, 0, cfg.inplace, "n/a", reason=str(exc)) for b in usable]
    rows: dict[str, dict[str, Any]] = {}
    ops: dict[str, timing.Timed] = {}
    for b in usable:
        device = registry.device_of(b)
        base = _record(case, dtype, b, data.nbytes, cfg.inplace, "ok")
        if case.large and device == "cpu" and not cfg.large:
            rows[b.name] = {**base, "status": "n/a", "reason": "CPU runs of GPT-2 XL need --large"}
            continue
        tick(b.name)
        timer = registry.timer_of(b)
        try:
            storage = registry.storage_of(b)
            if storage not in ("own", "none"):
                data.reset(storage)
            op = _quiet(b.make(data, cfg.inplace))
            first_s, out = timing.first_call(timer, op)
            err, ok = data.check(out, b.role)
            del out
        except Unsupported as exc:
            rows[b.name] = {**base, "status": "n/a", "reason": str(exc)}
            continue
        except NotImplementedError as exc:
            rows[b.name] = {**base, "status": "skipped", "reason": f"NotImplementedError: {exc}"}
            continue
        except Exception as exc:
            rows[b.name] = {**base, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            continue
        base.update(first_call_s=first_s, max_rel_err=err, tolerance=_tol(b.role, dtype))
        if not ok:
            rows[b.name] = {
                **base,
                "status": "FAILED",
                "reason": f"max relative error {err:.3g} > tolerance {base['tolerance']:.3g}",
            }
            continue
        rows[b.name] = base
        reset = None
        # per-sample clipping never writes its inputs: nothing to reset
        if cfg.inplace and storage not in ("own", "none") and case.kind != "persample":
            reset = _resetter(data, storage)
        ops[b.name] = timing.Timed(timer, op, reset, data.nbytes)
    try:
        stats = timing.interleaved(ops, cfg.repeat, tick) if ops else {}
    finally:
        data.release()
        del ops
        gc.collect()
    for name, st in stats.items():
        r = rows[name]
        r.update(st)
        r["gbps"] = r["nbytes"] / st["median_s"] / 1e9
    out = list(rows.values())
    _refloor(out, bw)
    return out


def _train_case(
    case: Case, dtype: str, cfg: BenchConfig, tick: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The ``train`` workload's rows: its own four forms (torch models, not arrays)."""
    from . import train

    def record(form: str, status: str, nbytes: int = 0, **kw: Any) -> dict[str, Any]:
        backend = registry.Backend(
            form, train.ROLES[form], "cpu", "cpu", "own", train.HELP[form], lambda: None,
            lambda data, inplace: lambda: None,
        )  # fmt: skip
        return _record(case, dtype, backend, nbytes, True, status, **kw)

    why = registry.probe_torch()
    if why is not None:
        return [record(f, "n/a", reason=why) for f in train.FORMS]
    rows = train.run_case(case, dtype, cfg, record, tick)
    _refloor(rows, {})
    return rows


def _memory_shortfall(case: Case, dtype: str, usable: list[registry.Backend]) -> str | None:
    """Why an ``adamw`` case cannot run here, or None: every backend keeps its own
    parameters and two moments (3 copies of the gradients' bytes) alive while the
    rounds interleave, on top of the gradients, the initial parameters and slack."""
    if case.kind != "adamw":
        return None
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: do not guess
        return None
    item = 8 if dtype == "float64" else 4
    host = sum(1 for b in usable if registry.device_of(b) == "cpu")
    need = case.size * item * (3 * host + 4)
    if need <= 0.9 * avail:
        return None
    return (
        f"needs about {need / 2**30:.1f} GiB of memory for {host} CPU backends, "
        f"{avail / 2**30:.1f} GiB available: pass fewer with --backends"
    )


def _resetter(data: CaseData, storage: str) -> Callable[[], None]:
    return lambda: data.reset(storage)


def _quiet(op: Callable[[], Any]) -> Callable[[], Any]:
    """``op`` with NumPy's floating-point warnings off: a peer that overflows (NumPy's
    float16 norm does) is reported FAILED by the check, not as a warning."""

    def run() -> Any:
        with np.errstate(all="ignore"):
            return op()

    return run


def _tol(role: str, dtype: str) -> float:
    from .data import TOLERANCE

    return TOLERANCE[role][dtype]


def _refloor(results: list[dict[str, Any]], bw: dict[str, Any]) -> None:
    """(Re)compute floors, fractions of the floor and speedups against every peer."""
    from .workloads import PASSES

    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["case"], r["dtype"], r["inplace"]), []).append(r)
        probe = bw.get(r["device"])
        if r.get("median_s") and probe and PASSES[r["kind"]]:
            r["floor_s"] = PASSES[r["kind"]] * r["nbytes"] / probe["bytes_per_s"]
            r["floor_fraction"] = r["floor_s"] / r["median_s"]
    for group in groups.values():
        peers = {
            r["backend"]: r["median_s"] for r in group if r["role"] == "peer" and r.get("median_s")
        }
        for r in group:
            if r.get("median_s"):
                r["speedup"] = {p: m / r["median_s"] for p, m in peers.items()}
