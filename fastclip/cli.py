"""The ``fastclip`` command: ``fastclip bench`` and ``fastclip info``.

``python -m fastclip`` is the same command.  ``main(argv)`` returns the exit
status: 0, 1 when a fastclip result was wrong (FAILED) or raised, or when the
reader of stdout went away (``| head``), 2 for bad arguments (argparse's
convention).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ._bench.command import add_parser as _add_bench_parser
from ._bench.command import bench as _bench
from ._bench.command import csv_list as _csv
from ._bench.command import parse_size as _parse_size
from ._version import __version__

__all__ = ["_parse_size", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
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
    p_info.set_defaults(command_parser=p_info)

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
    p_warm.set_defaults(command_parser=p_warm)

    _add_bench_parser(sub)
    return parser


class _Stdout:
    """print() for what the commands print on stdout.  A reader that has gone
    (``fastclip info | head -1``) ends the printing, not the command: the
    benchmark's --json and --plot files are still written, and ``main`` then
    returns 1."""

    def __init__(self) -> None:
        self.closed = False

    def __call__(self, text: str = "") -> None:
        if self.closed:
            return
        try:
            print(text, flush=True)  # flushed here: a closed pipe raises here, not at exit
        except BrokenPipeError:
            self.closed = True
            _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    """The recipe of https://docs.python.org/3/library/signal.html#note-on-sigpipe:
    Python flushes stdout at exit, and a flush into the closed pipe would print
    a second BrokenPipeError; from now on stdout's file descriptor is devnull."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _warmup(args: argparse.Namespace, out: _Stdout) -> int:
    import time

    from ._info import info
    from ._warmup import DTYPES, OPS, warmup

    parser = args.command_parser
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
    warmup(dtypes, ops, report=out)
    out(f"done in {time.perf_counter() - t0:.1f} s; numba cache: {info()['numba_cache']}")
    return 0


def _info(args: argparse.Namespace, out: _Stdout) -> int:
    from ._info import format_info, info

    report = info()
    out(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def _main(argv: list[str], out: _Stdout) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # unknown options: the error and usage of the command they were given to
    command_parser = getattr(args, "command_parser", parser)
    if unknown:
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "info":
        return _info(args, out)
    if args.command == "warmup":
        return _warmup(args, out)
    if args.command == "bench":  # its errors print the bench's usage, not the top level's
        return _bench(command_parser, args, argv, out)
    parser.print_help(sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastclip`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = _Stdout()
    try:
        try:
            code = _main(argv, out)
        finally:  # --help and --version print through argparse: flushed here, not at exit
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()
        return 1
    return 1 if out.closed else code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
