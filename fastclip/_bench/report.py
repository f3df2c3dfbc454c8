"""The table, ``--compare``, the JSON file, and the output paths' checks."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import textwrap
import warnings
from pathlib import Path
from typing import Any

from .workloads import PASSES


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _peers(results: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in results:
        for p in r.get("speedup", {}):
            if p not in seen:
                seen.append(p)
    return seen


#: The table's columns: (name, width, alignment); every one is explained in the
#: header's legend.  9 columns and their gaps: 110 characters.
_COLS = [
    ("workload", 24, "<"),
    ("dtype", 8, "<"),
    ("backend", 18, "<"),
    ("median", 10, ">"),
    ("iqr", 5, ">"),
    ("1st call", 9, ">"),
    ("GB/s", 6, ">"),
    ("floor", 6, ">"),
    ("max err", 8, ">"),
]


def _row(cells: list[str], cols: list[tuple[str, int, str]]) -> str:
    return "  ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, cols)).rstrip()


def format_table(report: dict[str, Any]) -> str:
    """Every case, dtype and backend (fits 120 columns), then the speedups against
    each peer, one small table per case (only the peers that ran it)."""
    results = report["results"]
    cols = _COLS
    out = [_header(report), "", _row([c[0] for c in cols], cols)]
    out.append("  ".join("-" * w for _, w, _ in cols))
    last_case = None
    for r in results:
        if r["status"] in ("n/a", "skipped"):
            continue
        if last_case is not None and r["case"] != last_case:
            out.append("")
        last_case = r["case"]
        cells = [r["case"], r["dtype"], r["backend"]]
        if r["status"] == "ok":
            iqr = (r["q75_s"] - r["q25_s"]) / r["median_s"]
            cells += [
                fmt_time(r["median_s"]),
                f"{iqr:.0%}",
                fmt_time(r.get("first_call_s")),
                f"{r['gbps']:.1f}",
                _pct(r.get("floor_fraction")),
                f"{r['max_rel_err']:.0e}",
            ]
        else:
            cells += [
                r["status"],
                "",
                fmt_time(r.get("first_call_s")),
                "",
                "",
                f"{r['max_rel_err']:.0e}" if "max_rel_err" in r else "",
            ]
        out.append(_row(cells, cols))
    speedups = _speedup_tables(results)
    if speedups:
        out += ["", "Speedups: x PEER = PEER's median / this median (>1: faster than PEER).", ""]
        out += speedups
    notes = _train_notes(report) + _notes(report)
    if notes:
        out += ["", *(textwrap.fill(n, 118, subsequent_indent="    ") for n in notes)]
    return "\n".join(out)


def _speedup_tables(results: list[dict[str, Any]]) -> list[str]:
    """For each case and dtype: fastclip's rows against the peers that ran it."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("speedup") and r["role"] == "fastclip":
            groups.setdefault((r["case"], r["dtype"]), []).append(r)
    lines: list[str] = []
    for (case, dtype), rows in groups.items():
        peers = _peers(rows)
        cols = [(f"{case} {dtype}", 34, "<")] + [(f"x {p}", max(8, len(p) + 2), ">") for p in peers]
        lines.append(_row([c[0] for c in cols], cols))
        for r in rows:
            sp = r["speedup"]
            cells = [f"  {r['backend']}"] + [f"{sp[p]:.2f}x" if p in sp else "" for p in peers]
            lines.append(_row(cells, cols))
        lines.append("")
    return lines[:-1]


def _header(report: dict[str, Any]) -> str:
    cfg = report["config"]
    bw = report["bandwidth"]
    parts = [
        f"fastclip bench: {'in place' if cfg['inplace'] else 'out of place'}, "
        f"median of {cfg['repeat']} interleaved rounds; iqr = interquartile range / median."
    ]
    for dev, probe in bw.items():
        if probe:
            parts.append(
                f"{dev} floor: {probe['bytes_per_s'] / 1e9:.1f} GB/s read+write "
                f"({probe['method']}, measured in this run)."
            )
    parts.append(
        "floor = time to move the data at that bandwidth "
        f"({PASSES['clip']} passes for norm clipping, {PASSES['value']} for value "
        f"clipping, {PASSES['norm']} for a norm, {PASSES['persample']} for per-sample clipping, "
        f"{PASSES['adamw']} for clip + a fused AdamW "
        "step: the gradients' bytes times the passes) / median; in-cache sizes can exceed 100%."
    )
    parts.append(
        "GB/s = data clipped per second; 1st call = the first call alone (compilation, "
        "caches, allocation; not in the median); max err = relative to a float64 "
        "reference; x PEER (below the table) = PEER's median / this median."
    )
    load = (report.get("load_average") or {}).get("start")
    cpus = (report.get("machine") or {}).get("cpu_count") or 1
    if load and load[0] > 0.25 * cpus:
        parts.append(
            f"Warning: load average {load[0]:.2f} at the start: other processes were "
            "busy, and parallel code (fastclip, torch) suffers most from that; "
            "compare ratios within this run, or run again on an idle machine."
        )
    m = report.get("machine", {})
    if m:
        parts.append(
            f"machine: {m.get('cpu_model')}, {m.get('cpu_count')} cores, "
            f"numba {m.get('numba_threads')} threads ({m.get('numba_threading_layer')}); "
            f"GPUs: {', '.join(m.get('gpus') or []) or 'none'}."
        )
    return "\n".join(textwrap.fill(p, 118, subsequent_indent="  ") for p in parts)


def _train_notes(report: dict[str, Any]) -> list[str]:
    """The ``train`` workload's share of a step spent clipping, per library."""
    from .train import clip_shares

    shares = clip_shares(report["results"])
    if not shares:
        return []
    parts = ", ".join(f"{lib} {share:.1%}" for lib, share in shares.items())
    return [
        f"train: share of a training step spent clipping (1 - step without clipping / step "
        f"with it, same library): {parts}; x *-noclip = the step without clipping / this "
        "step (1.00x: the clip is free)."
    ]


def _notes(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, why in report.get("skipped_backends", {}).items():
        lines.append(f"  {name}: {why}")
    by_reason: dict[tuple[str, str, str], list[str]] = {}
    for r in report["results"]:
        if r["status"] in ("n/a", "skipped", "error", "FAILED"):
            key = (r["backend"], r["status"], r.get("reason", ""))
            by_reason.setdefault(key, []).append(f"{r['case']} {r['dtype']}")
    for (name, status, why), where in by_reason.items():
        shown = ", ".join(where[:4]) + (f", ... ({len(where)} cases)" if len(where) > 4 else "")
        lines.append(f"  {name} {status} on {shown}: {why}")
    return ["Not run / not counted:", *lines] if lines else []


# ---------------------------------------------------------------- JSON


def _clean(x: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(
        json.dumps(_clean(report), indent=1, allow_nan=False) + "\n", encoding="utf-8"
    )


def load_json(path: str | Path) -> dict[str, Any]:
    """A saved report; ValueError if it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("fastclip-bench/"):
        raise ValueError(f"{path} is not a fastclip bench JSON file (no 'schema' field)")
    return data


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["case"], r["dtype"], r["inplace"], r["backend"])


def compare(
    new: dict[str, Any], old: dict[str, Any], old_name: str = "old"
) -> tuple[str, list[dict[str, Any]]]:
    """Table of old median / new median for every result present in both runs."""
    old_by = {_key(r): r for r in old["results"] if r.get("median_s")}
    rows = []
    for r in new["results"]:
        o = old_by.get(_key(r))
        if o is None or not r.get("median_s"):
            continue
        rows.append(
            {
                "case": r["case"],
                "dtype": r["dtype"],
                "backend": r["backend"],
                "old_s": o["median_s"],
                "new_s": r["median_s"],
                "ratio": o["median_s"] / r["median_s"],
                "old_floor": o.get("floor_fraction"),
                "new_floor": r.get("floor_fraction"),
            }
        )
    head = [
        f"Compared with {old_name} (created {old.get('created', '?')}): "
        "ratio = old median / new median (>1: faster now)."
    ]
    om, nm = old.get("machine", {}), new.get("machine", {})
    if om.get("cpu_model") != nm.get("cpu_model") or om.get("cpu_count") != nm.get("cpu_count"):
        head.append(
            f"Warning: different machines: old {om.get('cpu_model')} "
            f"({om.get('cpu_count')} cores), new {nm.get('cpu_model')} "
            f"({nm.get('cpu_count')} cores)."
        )
    if not rows:
        return "\n".join([*head, "No result in common (case, dtype, in place, backend)."]), rows
    w = ("<24", "<8", "<18", ">10", ">10", ">7", ">12")
    names = ("workload", "dtype", "backend", "old", "new", "ratio", "floor")
    lines = [*head, "", "  ".join(f"{n:{a}}" for n, a in zip(names, w))]
    for c in rows:
        cells = (
            c["case"],
            c["dtype"],
            c["backend"],
            fmt_time(c["old_s"]),
            fmt_time(c["new_s"]),
            f"{c['ratio']:.2f}",
            f"{_pct(c['old_floor'])}->{_pct(c['new_floor'])}",
        )
        lines.append("  ".join(f"{v:{a}}" for v, a in zip(cells, w)))
    return "\n".join(lines), rows


# ---------------------------------------------------------------- output paths
# ``fastclip bench`` checks --json and --plot before it times anything: a path
# that cannot be written would otherwise fail after the whole run.


def path_error(path: str, option: str) -> str | None:
    """Why ``path`` cannot be written (a message naming ``option``), or None.

    Leaves the file system as it was: an existing file is opened for writing
    without truncation, a new one is tried as a temporary file in its directory,
    removed at once.  ``os.access`` alone is not enough: for root it answers
    "writable" for /proc, where creating a file fails.
    """
    p = Path(path)
    if p.is_dir():
        return f"{option}: {path} is a directory; give a file name, e.g. {p / 'run.json'}"
    if p.exists():
        if not p.is_file():  # a device or a FIFO: opening it could block or act
            ok = os.access(p, os.W_OK)
            return None if ok else f"{option}: cannot write {path}: permission denied"
        try:
            os.close(os.open(p, os.O_WRONLY))
        except OSError as exc:
            return f"{option}: cannot write {path}: {exc.strerror}; choose another path"
        return None
    parent = p.parent
    if not parent.is_dir():
        if parent.exists():
            return f"{option}: cannot write {path}: {parent} is a file, not a directory"
        return f"{option}: cannot write {path}: directory {parent} does not exist; create it first"
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".fastclip-write-test-")
    except OSError as exc:
        return (
            f"{option}: cannot write {path}: cannot create a file in {parent} "
            f"({exc.strerror}); choose another directory"
        )
    os.close(fd)
    os.unlink(probe)
    return None


def plot_formats() -> dict[str, str]:
    """The file extensions ``--plot`` can write here: matplotlib's savefig
    formats, less pgf without its TeX program and the Pillow formats that this
    Pillow build lacks (both would fail only when the figure is saved).
    ImportError without matplotlib."""
    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    formats = dict(FigureCanvasBase.get_supported_filetypes())
    # the pgf backend measures text with a TeX installation (pgf.texsystem)
    if "pgf" in formats and shutil.which(str(matplotlib.rcParams["pgf.texsystem"])) is None:
        del formats["pgf"]
    for ext in ("webp", "avif"):  # optional in Pillow builds; matplotlib saves them with it
        if ext in formats and not _pillow_has(ext):
            del formats[ext]
    return formats


def _pillow_has(feature: str) -> bool:
    try:
        from PIL import features
    except ImportError:
        return False
    with warnings.catch_warnings():  # an older Pillow warns about a feature it never heard of
        warnings.simplefilter("ignore")
        return bool(features.check(feature))


def plot_path_error(path: str) -> str | None:
    """Why ``--plot path`` cannot be drawn (a message), or None; ImportError
    (the install hint) without matplotlib."""
    from .plot import check_available

    check_available()
    formats = plot_formats()
    shown = ", ".join(formats)
    ext = Path(path).suffix  # "run." has the suffix "" (Python 3.11) or "." (3.14)
    if ext in ("", "."):  # matplotlib would append .png: a file of another name than asked
        return (
            f"--plot: {path} has no extension; give one, e.g. {path.rstrip('.')}.png "
            f"(formats: {shown})"
        )
    if ext[1:].lower() not in formats:
        return f"--plot: matplotlib cannot write {ext!r} files here; use one of: {shown}"
    return path_error(path, "--plot")
