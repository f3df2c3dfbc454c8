"""A dependency-free progress display on stderr: one bar per workload.

Each workload gets its own bar, which advances within a case (one unit per
backend checked, one per timing round), not only when a case ends.  On a
terminal the bar is redrawn in place and left on screen, finished, when the
next workload starts; otherwise (logs, CI, pipes) every update is a line of
its own, so a log shows where a long step is instead of sitting on its first
line.  ``note`` prints a line of its own in both modes (the time and memory a
big case needs, before it starts).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 120  # no line is longer: the terminal must not wrap it


class Progress:
    """Progress of a benchmark run, one workload (bar) at a time.

    ``begin(name, cases, units)`` starts a workload of ``cases`` cases of
    ``units`` sub-steps each; ``tick(msg)`` advances one sub-step (never past
    the end of the current case), ``step(msg)`` finishes the current case,
    ``update(msg)`` redraws without advancing.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool = True, width: int = 24) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.name = ""
        self.cases = 1
        self.units = 1
        self.done = 0  # finished cases of the current workload
        self.sub = 0  # finished sub-steps of the current case
        self._last = 0  # length of the line on screen (terminal only)

    def begin(self, name: str, cases: int, units: int = 1) -> None:
        """Start the bar of workload ``name``; the previous bar stays on screen."""
        self._newline()
        self.name, self.cases, self.units = name, max(1, cases), max(1, units)
        self.done = self.sub = 0

    @property
    def fraction(self) -> float:
        return min(1.0, (self.done * self.units + self.sub) / (self.cases * self.units))

    def _line(self, msg: str) -> str:
        filled = round(self.width * self.fraction)
        bar = "#" * filled + "." * (self.width - filled)
        el = time.perf_counter() - self.t0
        case = min(self.done + 1, self.cases)
        head = f"[{bar}] {self.name} {case}/{self.cases} {100 * self.fraction:3.0f}% {el:5.1f}s"
        return f"{head} {msg}"[:WIDTH]

    def _write(self, line: str) -> None:
        if self.tty:
            pad = max(0, self._last - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._last = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _newline(self) -> None:
        if self.enabled and self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()
            self._last = 0

    def update(self, msg: str) -> None:
        """Show ``msg`` for the step in progress (the bar does not move)."""
        if self.enabled:
            self._write(self._line(msg))

    def tick(self, msg: str) -> None:
        """One sub-step of the current case done (never past the case's end)."""
        self.sub = min(self.sub + 1, self.units)
        self.update(msg)

    def step(self, msg: str) -> None:
        """The current case finished."""
        self.done = min(self.done + 1, self.cases)
        self.sub = 0
        self.update(msg)

    def note(self, msg: str) -> None:
        """A line of its own, kept on a terminal too (the bar is redrawn after it)."""
        if not self.enabled:
            return
        self._newline()
        self.stream.write(msg[:WIDTH] + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._newline()
