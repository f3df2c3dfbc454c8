"""A dependency-free progress bar on stderr.

On a terminal it redraws one line; otherwise (logs, CI, pipes) it prints one
line per update (each backend, each timing round) and per finished step, so
a log shows where a long step is instead of sitting on its first line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self, total: int, stream: TextIO | None = None, enabled: bool = True, width: int = 24
    ) -> None:
        self.total = max(1, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last = 0

    def _line(self, msg: str) -> str:
        filled = round(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        el = time.perf_counter() - self.t0
        return f"[{bar}] {self.done}/{self.total} {el:5.1f}s {msg}"

    def update(self, msg: str) -> None:
        """Show ``msg`` for the step in progress: redrawn on a terminal, one line
        otherwise."""
        if not self.enabled:
            return
        line = self._line(msg)[:120]
        if self.tty:
            pad = max(0, self._last - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._last = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def step(self, msg: str) -> None:
        """One step finished."""
        self.done += 1
        if not self.enabled:
            return
        self.update(msg)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * self._last + "\r")
            self.stream.flush()
