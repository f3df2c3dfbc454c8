"""The ``fastclip`` command: ``fastclip bench`` and ``fastclip info``.

``python -m fastclip`` is the same command.  ``main(argv)`` returns the exit
status: 0, 1 when a fastclip result was wrong (FAILED) or raised, 2 for bad
arguments (argparse's convention).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ._version import __version__

_BENCH_DESCRIPTION = """\
Time gradient clipping on this machine: fastclip against the tools used today
(NumPy, torch.nn.utils.clip_grad_norm_ with and without foreach, CuPy, optax),
on the CPU and on a GPU where one is usable.

Every implementation's result is checked against a float64 NumPy reference in
the same run (a wrong result shows as FAILED, never as a time); implementations
are interleaved and repeated and the median is reported with its spread; the
first call (Numba compilation or cache loading) is timed separately. The
bandwidth floor is measured in the same run: a parallel in-place scale of a
256 MiB float32 array (Numba prange), and a clip must read its data twice and
write it once. Libraries that are missing, and GPUs that are absent, are listed
as skipped with the reason.

With no arguments a quick suite runs (about a minute on 2 cores) and prints one
table."""

_BENCH_EPILOG = """\
workloads:
{workloads}

backends:
{backends}

examples:
  fastclip bench                                    quick suite, float32, in place
  fastclip bench --full --json run.json --plot run.png
  fastclip bench --workloads single --sizes 1e6,1e7,1e8 --backends fastclip,numpy
  fastclip bench --dtypes float32,bfloat16 --out-of-place
  fastclip bench --compare benchmarks/results/cpu-mymachine.json

exit status: 0; 1 if a fastclip result was FAILED or raised; 2 for bad arguments."""


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse_size(text: str) -> int:
    """'1e6', '1000000', '1_000_000' -> 1000000; ValueError otherwise."""
    t = text.strip().replace("_", "")
    try:
        v = float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v != int(v):
        raise ValueError(f"{text!r} is not a whole number of elements")
    if v < 1:
        raise ValueError(f"{text!r}: sizes must be at least 1")
    if v > 4e9:
        raise ValueError(f"{text!r}: sizes above 4e9 elements are not supported")
    return int(v)


def build_parser() -> argparse.ArgumentParser:
    from ._bench.data import DTYPES
    from ._bench.registry import BACKENDS
    from ._bench.workloads import WORKLOADS

    parser = argparse.ArgumentParser(
        prog="fastclip",
        description="fastclip: fast, exact gradient clipping for NumPy, PyTorch and any "
        "Array API library.",
        epilog="Run 'fastclip COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fastclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_info = sub.add_parser(
        "info",
        help="versions, Numba threading, the route each array library takes, GPUs seen",
        description="Print fastclip.info(): versions, the Numba threading layer and threads, "
        "the route each installed array library takes, and the GPUs seen.",
    )
    p_info.add_argument("--json", action="store_true", help="print it as JSON")

    from ._warmup import DTYPES as WARM_DTYPES
    from ._warmup import OPS as WARM_OPS

    ops_help = "\n".join(f"  {n:<11} {h}" for n, h in WARM_OPS.items())
    p_warm = sub.add_parser(
        "warmup",
        help="compile and cache the CPU kernels now (containers, clusters, first calls)",
        description="Compile the CPU kernels of the chosen operations for the chosen dtypes "
        "(serial and parallel twins) and cache them on disk, so that later processes "
        "load them instead of compiling at their first call.",
        epilog=f"operations:\n{ops_help}\n\ndtypes: {', '.join(WARM_DTYPES)} (bfloat16 "
        "needs torch)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_warm.add_argument(
        "--dtypes", metavar="LIST", default="float32,float64", help="default: float32,float64"
    )
    p_warm.add_argument("--ops", metavar="LIST", default="all", help="default: all")
    p_warm.set_defaults(warm_parser=p_warm)

    wl = "\n".join(
        f"  {n:<12} {w.help}{'' if w.in_quick else '  [not in the quick suite]'}"
        for n, w in WORKLOADS.items()
    )
    bk = "\n".join(f"  {n:<19} {b.help}" for n, b in BACKENDS.items())
    p = sub.add_parser(
        "bench",
        help="time clipping here: fastclip against NumPy, torch, CuPy, optax",
        description=_BENCH_DESCRIPTION,
        epilog=_BENCH_EPILOG.format(workloads=wl, backends=bk),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(bench_parser=p)
    sel = p.add_argument_group("what to run")
    sel.add_argument(
        "--workloads",
        metavar="LIST",
        help="comma-separated workload names, or 'all' (default: the quick suite; "
        "with --full every workload)",
    )
    sel.add_argument(
        "--backends",
        metavar="LIST",
        help="comma-separated backend names (default: all; missing ones are listed as skipped)",
    )
    sel.add_argument(
        "--dtypes",
        metavar="LIST",
        default="float32",
        help=f"comma-separated dtypes among {', '.join(DTYPES)} (default: float32)",
    )
    sel.add_argument(
        "--sizes",
        metavar="LIST",
        help="element counts for the sized workloads (single, rows, value, norm), "
        "e.g. 1e3,1e5,1e7 (rows: 256 x size/256)",
    )
    sel.add_argument(
        "--repeat",
        metavar="N",
        type=int,
        default=7,
        help="interleaved timing rounds per case (default: 7)",
    )
    mode = sel.add_mutually_exclusive_group()
    mode.add_argument(
        "--inplace",
        dest="inplace",
        action="store_true",
        default=True,
        help="clip in place, as training loops do (default)",
    )
    mode.add_argument(
        "--out-of-place",
        dest="inplace",
        action="store_false",
        help="return new arrays and leave the inputs untouched",
    )
    sel.add_argument(
        "--full",
        action="store_true",
        help="every workload and the full size sweep 1e3..1e8 (several minutes)",
    )
    sel.add_argument(
        "--large",
        action="store_true",
        help="also run GPT-2 XL (1.56B values, 6 GB in float32) on the CPU",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--json",
        metavar="PATH",
        dest="json_path",
        help="write every figure and the machine's description to PATH",
    )
    out.add_argument(
        "--compare", metavar="OLD.json", help="also print the ratio of each median to a saved run"
    )
    out.add_argument(
        "--plot",
        metavar="PATH.png",
        help="draw throughput against size, one line per backend (needs matplotlib)",
    )
    out.add_argument(
        "--from",
        dest="from_json",
        metavar="RUN.json",
        help="run nothing: print the table (and --plot) of a saved --json run",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return parser


def _bench_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]
) -> tuple[Any, dict[str, Any] | None]:
    from ._bench import BenchConfig
    from ._bench.data import DTYPES
    from ._bench.registry import BACKENDS
    from ._bench.report import load_json
    from ._bench.workloads import WORKLOADS

    def pick(value: str | None, valid: Any, what: str) -> tuple[str, ...] | None:
        if value is None:
            return None
        items = _csv(value)
        if items == ["all"]:
            return tuple(valid)
        if not items:
            parser.error(f"--{what} is empty; choose from: {', '.join(valid)}")
        bad = [i for i in items if i not in valid]
        if bad:
            parser.error(
                f"unknown {what[:-1]} {', '.join(map(repr, bad))}; choose from: {', '.join(valid)}"
            )
        return tuple(dict.fromkeys(items))

    workloads = pick(args.workloads, WORKLOADS, "workloads")
    backends = pick(args.backends, BACKENDS, "backends")
    dtypes = pick(args.dtypes, DTYPES, "dtypes") or ("float32",)
    sizes = None
    if args.sizes is not None:
        try:
            sizes = tuple(_parse_size(s) for s in _csv(args.sizes))
        except ValueError as exc:
            parser.error(f"--sizes: {exc}")
        if not sizes:
            parser.error("--sizes is empty; give element counts such as 1e3,1e6")
        chosen = workloads or tuple(WORKLOADS)
        if not any(WORKLOADS[w].sized for w in chosen):
            parser.error(
                "--sizes applies to the sized workloads (single, rows, value, norm), "
                "and none is selected"
            )
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.plot:
        from ._bench.plot import INSTALL_HINT, check_available

        try:
            check_available()
        except ImportError:
            parser.error(INSTALL_HINT)
    for path in (args.json_path, args.plot):
        if path and not Path(path).resolve().parent.is_dir():
            parser.error(f"cannot write {path}: directory {Path(path).parent} does not exist")
    old = None
    if args.compare:
        try:
            old = load_json(args.compare)
        except ValueError as exc:
            parser.error(f"--compare: {exc}")
    cfg = BenchConfig(
        workloads=workloads,
        backends=backends,
        dtypes=dtypes,
        sizes=sizes,
        repeat=args.repeat,
        inplace=args.inplace,
        large=args.large,
        full=args.full,
        progress=not args.quiet,
        argv=argv,
    )
    return cfg, old


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    from ._bench import run
    from ._bench.report import compare, format_table, load_json, write_json

    if args.from_json:  # a saved run: its table and plot, nothing timed
        try:
            report = load_json(args.from_json)
        except ValueError as exc:
            parser.error(f"--from: {exc}")
        print(format_table(report))
        if args.plot:
            from ._bench.plot import plot

            plot(report, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        return 0
    cfg, old = _bench_config(parser, args, argv)
    report = run(cfg)
    print(format_table(report))
    if old is not None:
        text, rows = compare(report, old, args.compare)
        report["compare"] = {"path": args.compare, "rows": rows}
        print()
        print(text)
    if args.json_path:
        write_json(report, args.json_path)
        print(f"\nwrote {args.json_path}", file=sys.stderr)
    if args.plot:
        from ._bench.plot import plot

        plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    bad = [
        r
        for r in report["results"]
        if r["role"] == "fastclip" and r["status"] in ("FAILED", "error")
    ]
    return 1 if bad else 0


def _warmup(args: argparse.Namespace) -> int:
    import time

    from ._info import info
    from ._warmup import DTYPES, OPS, warmup

    parser = args.warm_parser
    dtypes = tuple(_csv(args.dtypes))
    ops = tuple(OPS) if args.ops == "all" else tuple(_csv(args.ops))
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}; choose from: {', '.join(DTYPES)}")
    for op in ops:
        if op not in OPS:
            parser.error(f"unknown operation {op!r}; choose from: {', '.join(OPS)}")
    if not dtypes or not ops:
        parser.error("--dtypes and --ops need at least one name each")
    t0 = time.perf_counter()
    warmup(dtypes, ops, report=print)
    print(f"done in {time.perf_counter() - t0:.1f} s; numba cache: {info()['numba_cache']}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ._info import format_info, info

    report = info()
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastclip`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    if args.command == "warmup":
        return _warmup(args)
    if args.command == "bench":  # its errors print the bench's usage, not the top level's
        return _bench(args.bench_parser, args, argv)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
