"""When a kernel above the size threshold runs in parallel: the contention back-off.

A parallel region ends at a barrier: it is as slow as its slowest thread.  On a
machine whose cores are all taken (other processes, or another OpenMP pool's
spinning workers) one of numba's threads waits for a time slice, and the
region takes milliseconds instead of microseconds.  Measured on the 2-core
machine with two ``while True: pass`` processes (``python
benchmarks/bench_busy.py``): ``clip_by_norm_`` of 1e6 float32 took 51 ms in
parallel, 1.05 ms serially, NumPy's serial clip 0.94 ms.

The ``auto`` policy (the default) therefore times its own launches:

* the first launch of a kernel in a size class (a power of two of elements)
  runs serially, and every serial launch updates the serial time per element
  of that class (see ``record``); launches that compiled their kernel are not
  timed;
* ``cfg.CONTENTION_STRIKES`` parallel launches in a row that each take more
  than ``cfg.CONTENTION_RATIO`` times the serial time of their class start a
  *back-off*: launches run serially for ``cfg.BACKOFF_MIN_MS``; then one
  parallel probe, and if it is slow again a back-off twice as long (up to
  ``cfg.BACKOFF_MAX_MS``); a fast launch resets the length and the strikes.

The timing costs two ``perf_counter_ns`` calls per launch above the threshold
(about 0.2 us against 15 us or more of kernel).  Other signals were measured
and rejected: ``/proc/loadavg``'s running count was 2 right after one of our
own parallel clips and 1 after 20 ms idle (our spinning worker counts as
load), reading it cost 18 us, and it does not exist off Linux; the
``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` of numba's pool cannot be chosen apart
from torch's when torch was imported first (numba's ``omppool`` then binds
``GOMP_parallel`` to torch's own libgomp: one runtime, already initialised).

``cfg.THREADS`` (``FASTCLIP_THREADS`` in the environment at import) forces a
policy: ``"parallel"`` (parallel above the threshold, always: fastclip before
this policy), ``"serial"`` (never parallel), ``"auto"``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable

from .. import _config as cfg

MODES = ("auto", "parallel", "serial")


def check_mode(mode: object) -> str:
    """``mode`` if it names a policy, else a ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(
            f"fastclip: unknown CPU thread policy {mode!r} (fastclip._config.THREADS, "
            f"or FASTCLIP_THREADS in the environment): choose one of {', '.join(MODES)}"
        )
    return mode  # type: ignore[return-value]


class Backoff:
    """The ``auto`` policy's state: serial rates per size class, the back-off window.

    Thread-safe: updates hold a lock; the decision reads plain attributes (a
    stale read only moves one launch to the other kernel, never a wrong result).
    """

    def __init__(self) -> None:
        self.serial_ns: dict[tuple[Hashable, int], float] = {}  # best ns per element
        self.until_ns = 0  # serial until this perf_counter_ns
        self.length_ms = cfg.BACKOFF_MIN_MS  # the next back-off's length
        self.backoffs = 0  # back-offs started (reported by ``fastclip info``)
        self.strikes = 0  # slow parallel launches in a row
        self.lock = threading.Lock()

    def parallel(self, key: Hashable, n: int, now_ns: int) -> bool:
        """Whether a launch of kernel ``key`` on ``n`` elements goes parallel now."""
        if now_ns < self.until_ns:
            return False
        return (key, n.bit_length()) in self.serial_ns  # no serial rate yet: serial first

    def record(self, key: Hashable, n: int, parallel: bool, start_ns: int, end_ns: int) -> None:
        """Learn from a launch that took ``end_ns - start_ns``."""
        per_element = (end_ns - start_ns) / max(n, 1)
        cls = (key, n.bit_length())
        with self.lock:
            best = self.serial_ns.get(cls)
            if not parallel:
                # Falls at once to a faster sample, rises halfway to a slower one: a
                # descheduled serial call barely moves it, and a costlier variant of
                # the kernel in the same class (a p-norm after an L2 norm, float64
                # after float32) is learnt during its back-off instead of keeping
                # it serial for good.
                if best is None or per_element < best:
                    self.serial_ns[cls] = per_element
                else:
                    self.serial_ns[cls] = best + 0.5 * (per_element - best)
                return
            if best is None:
                return
            if per_element <= cfg.CONTENTION_RATIO * best:
                self.strikes = 0
                self.length_ms = cfg.BACKOFF_MIN_MS
                return
            self.strikes += 1
            if self.strikes >= cfg.CONTENTION_STRIKES:
                self.until_ns = end_ns + int(self.length_ms * 1e6)
                self.length_ms = min(2 * self.length_ms, cfg.BACKOFF_MAX_MS)
                self.backoffs += 1
                self.strikes -= 1  # the probe after a back-off needs only one strike

    def describe(self, now_ns: int | None = None) -> str:
        now_ns = time.perf_counter_ns() if now_ns is None else now_ns
        if now_ns < self.until_ns:
            left = (self.until_ns - now_ns) / 1e6
            return f"serial for {left:.0f} ms more (parallel was slower than serial)"
        return f"parallel unless measured slower ({self.backoffs} back-offs so far)"
