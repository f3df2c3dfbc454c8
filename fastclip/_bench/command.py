"""``fastclip bench``'s options, their checks, and what the command prints.

``fastclip.cli`` builds the top-level parser and calls ``add_parser`` and
``bench``; everything here runs before or after ``runner.run``: the options are
checked (the output paths included) before anything is timed.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
  fastclip bench --from new.json --compare old.json --plot new.svg

--json and --plot are checked before anything is timed: a directory, a path that
cannot be written, or a --plot extension matplotlib cannot write (or none) is an
argument error. --from RUN.json times nothing: it prints the saved run's table,
and --compare, --plot and --json (which saves the run again, with the
comparison) apply to it; the options that choose what to run are refused.

exit status: 0; 1 if a fastclip result was FAILED or raised, or if stdout was
closed early (| head); 2 for bad arguments."""


_DEFAULT_REPEAT = 7

#: The options of "what to run" (dest, option): a saved run (--from) was timed
#: with its own, so they are refused there rather than ignored.
_RUN_OPTIONS = (
    ("workloads", "--workloads"),
    ("backends", "--backends"),
    ("dtypes", "--dtypes"),
    ("sizes", "--sizes"),
    ("repeat", "--repeat"),
    ("inplace", "--inplace"),
    ("full", "--full"),
    ("large", "--large"),
)


def csv_list(value: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_size(text: str) -> int:
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


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``bench`` subcommand's parser, added to ``sub`` (argparse's subparsers)."""
    from .data import DTYPES
    from .registry import BACKENDS
    from .workloads import WORKLOADS

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
    p.set_defaults(command_parser=p)
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
        help=f"interleaved timing rounds per case (default: {_DEFAULT_REPEAT})",
    )
    mode = sel.add_mutually_exclusive_group()
    mode.add_argument(
        "--inplace",
        dest="inplace",
        action="store_true",
        help="clip in place, as training loops do (default)",
    )
    mode.add_argument(
        "--out-of-place",
        dest="inplace",
        action="store_false",
        help="return new arrays and leave the inputs untouched",
    )
    # None until given (then True or False): --from refuses them when given
    p.set_defaults(inplace=None)
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
    out = p.add_argument_group(
        "output",
        "checked before anything is timed; with --from, --json, --compare and --plot "
        "apply to the saved run",
    )
    out.add_argument(
        "--json",
        metavar="PATH",
        dest="json_path",
        help="write every figure and the machine's description to PATH (with --from: "
        "save the saved run again, with --compare's ratios)",
    )
    out.add_argument(
        "--compare", metavar="OLD.json", help="also print the ratio of each median to a saved run"
    )
    out.add_argument(
        "--plot",
        metavar="PATH.png",
        help="draw throughput against size, one line per backend (needs matplotlib); "
        "the extension picks the format: png, pdf, svg, ...",
    )
    out.add_argument(
        "--from",
        dest="from_json",
        metavar="RUN.json",
        help="run nothing: print the table of a saved --json run; --compare, --plot and "
        "--json apply to it, the options of 'what to run' are refused",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return p


def _check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--json and --plot before anything is timed or printed; nothing is written."""
    from .plot import INSTALL_HINT
    from .report import path_error, plot_path_error

    if args.plot:
        try:
            why = plot_path_error(args.plot)
        except ImportError:
            parser.error(INSTALL_HINT)
        if why:
            parser.error(why)
    if args.json_path:
        why = path_error(args.json_path, "--json")
        if why:
            parser.error(why)
    if args.json_path and args.plot and Path(args.json_path).resolve() == Path(args.plot).resolve():
        parser.error(f"--json and --plot both name {args.plot}; give them different paths")


def _load_compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    from .report import load_json

    if not args.compare:
        return None
    try:
        return load_json(args.compare)
    except ValueError as exc:
        parser.error(f"--compare: {exc}")


def _refuse_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--from with an option that chooses what to run: an error, not ignored."""
    given = []
    for dest, option in _RUN_OPTIONS:
        value = getattr(args, dest)
        if dest == "inplace":  # None until --inplace (True) or --out-of-place (False)
            if value is not None:
                given.append(option if value else "--out-of-place")
        elif value is not None and value is not False:  # --full, --large: False by default
            given.append(option)
    if given:
        one = len(given) == 1
        parser.error(
            f"{', '.join(given)} {'has' if one else 'have'} no effect with --from: a saved run "
            f"is shown as it was timed; drop {'it' if one else 'them'}, or drop --from to "
            "time a new run"
        )


def _bench_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]
) -> tuple[Any, dict[str, Any] | None]:
    from .data import DTYPES
    from .registry import BACKENDS
    from .runner import BenchConfig
    from .workloads import WORKLOADS

    def pick(value: str | None, valid: Any, what: str) -> tuple[str, ...] | None:
        if value is None:
            return None
        items = csv_list(value)
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
            sizes = tuple(parse_size(s) for s in csv_list(args.sizes))
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
    repeat = _DEFAULT_REPEAT if args.repeat is None else args.repeat
    if repeat < 1:
        parser.error(f"--repeat must be at least 1, got {repeat}")
    _check_outputs(parser, args)
    old = _load_compare(parser, args)
    cfg = BenchConfig(
        workloads=workloads,
        backends=backends,
        dtypes=dtypes,
        sizes=sizes,
        repeat=repeat,
        inplace=args.inplace is not False,
        large=args.large,
        full=args.full,
        progress=not args.quiet,
        argv=argv,
    )
    return cfg, old


def bench(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: list[str],
    out: Callable[..., None],
) -> int:
    """Run (or, with --from, load) the benchmark and print it; the exit status."""
    from .report import compare, format_table, load_json, write_json
    from .runner import run

    if args.from_json:  # a saved run: its table, comparison, plot and JSON, nothing timed
        _refuse_run_options(parser, args)
        _check_outputs(parser, args)
        try:
            report = load_json(args.from_json)
        except ValueError as exc:
            parser.error(f"--from: {exc}")
        old = _load_compare(parser, args)
        code = 0
    else:
        cfg, old = _bench_config(parser, args, argv)
        report = run(cfg)
        bad = [
            r
            for r in report["results"]
            if r["role"] == "fastclip" and r["status"] in ("FAILED", "error")
        ]
        code = 1 if bad else 0
    out(format_table(report))
    if old is not None:
        text, rows = compare(report, old, args.compare)
        report["compare"] = {"path": args.compare, "rows": rows}
        out()
        out(text)
    if args.json_path:
        write_json(report, args.json_path)
        print(f"\nwrote {args.json_path}", file=sys.stderr)
    if args.plot:
        from .plot import plot

        plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return code
