"""``--plot``: throughput against size, one line per backend (matplotlib, optional)."""

from __future__ import annotations

from typing import Any

from .workloads import PASSES, WORKLOADS

INSTALL_HINT = "--plot needs matplotlib: pip install matplotlib (the 'plot' extra)"


def check_available() -> None:
    """ImportError with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc


def plot(report: dict[str, Any], path: str) -> None:
    check_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r.get("median_s")]
    sized = [r for r in ok if WORKLOADS.get(r["workload"]) and WORKLOADS[r["workload"]].sized]
    sweep_wl = (
        "single"
        if any(r["workload"] == "single" for r in sized)
        else (sized[0]["workload"] if sized else None)
    )
    sweep = [r for r in sized if r["workload"] == sweep_wl]
    in_sweep = {id(r) for r in sweep}
    fixed = [r for r in ok if id(r) not in in_sweep]
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    colors = {b: f"C{i % 10}" for i, b in enumerate(backends)}
    dtypes = list(dict.fromkeys(r["dtype"] for r in ok))
    styles = dict(zip(dtypes, ["-", "--", ":", "-."]))

    ncols = (1 if sweep else 0) + (1 if fixed else 0)
    fig, axes = plt.subplots(1, max(ncols, 1), figsize=(7.5 * max(ncols, 1), 6.0), squeeze=False)
    ax_list = list(axes[0])
    cfg = report.get("config", {})
    mode = "in place" if cfg.get("inplace", True) else "out of place"
    if sweep:
        ax = ax_list.pop(0)
        kind = WORKLOADS[str(sweep_wl)].kind
        ceilings = {
            dev: probe["bytes_per_s"] / PASSES[kind] / 1e9
            for dev, probe in report.get("bandwidth", {}).items()
            if probe
        }
        for b in backends:
            for dt in dtypes:
                rows = sorted(
                    (r for r in sweep if r["backend"] == b and r["dtype"] == dt),
                    key=lambda r: r["size"],
                )
                if not rows:
                    continue
                sx = [r["size"] for r in rows]
                sy = [r["gbps"] for r in rows]
                # the interquartile range of the rounds, as GB/s (slow round = low GB/s)
                lo = [max(0.0, y - r["nbytes"] / r["q75_s"] / 1e9) for r, y in zip(rows, sy)]
                hi = [max(0.0, r["nbytes"] / r["q25_s"] / 1e9 - y) for r, y in zip(rows, sy)]
                label = b if len(dtypes) == 1 else f"{b} {dt}"
                ax.errorbar(
                    sx, sy, yerr=[lo, hi], fmt=styles[dt], marker="o", ms=4, capsize=3,
                    color=colors[b], label=label,
                )  # fmt: skip
                ceiling = ceilings.get(rows[0]["device"])
                if ceiling is not None:  # above the DRAM ceiling: the data sat in cache
                    cached = [(x, y) for x, y in zip(sx, sy) if y > ceiling]
                    if cached:
                        cx, cy = zip(*cached)
                        ax.plot(cx, cy, "o", ms=9, mfc="none", mec=colors[b], alpha=0.6)
        for dev, ceiling in ceilings.items():  # in the legend: no text over the lines
            ax.axhline(
                ceiling,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"{dev} memory ceiling ({PASSES[kind]} passes at the measured bandwidth); "
                "ringed points above it ran from cache",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("elements in the array")
        ax.set_ylabel("GB/s of data clipped (higher is better; bars: IQR of the rounds)")
        ax.set_title(f"{WORKLOADS[str(sweep_wl)].help.split('(')[0].strip()}, {mode}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=2)
    if fixed:
        ax = ax_list.pop(0)
        groups = list(dict.fromkeys((r["case"], r["dtype"]) for r in fixed))
        width = 0.8 / max(1, len(backends))
        for i, b in enumerate(backends):
            xs: list[float] = []
            ys: list[float] = []
            for g, (case, dt) in enumerate(groups):
                for r in fixed:
                    if (r["case"], r["dtype"], r["backend"]) == (case, dt, b):
                        xs.append(g + (i - (len(backends) - 1) / 2) * width)
                        ys.append(r["gbps"])
            if xs:
                ax.bar(xs, ys, width, color=colors[b], label=b)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(
            [c if len(dtypes) == 1 else f"{c}\n{d}" for c, d in groups],
            rotation=35,
            ha="right",
            fontsize=7,
        )
        ax.set_yscale("log")
        ax.set_ylabel("GB/s of data (higher is better)")
        ax.set_title(f"other workloads, {mode}", fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the bars
    m = report.get("machine", {})
    load = (report.get("load_average") or {}).get("start")
    busy = (
        f" - machine busy (load {load[0]:.1f})"
        if load and load[0] > 0.25 * (m.get("cpu_count") or 1)
        else ""
    )
    fig.suptitle(
        f"fastclip bench on {m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} cores"
        f"{', ' + ', '.join(m['gpus']) if m.get('gpus') else ''}){busy}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
