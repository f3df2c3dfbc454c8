"""Running the kernels: serial below a size threshold, parallel above it unless contended.

``run`` / ``run_serial`` launch a kernel of the kernel modules by name
(``_build.kernel``); ``run_with`` launches any serial/parallel pair
(``_build.jit_pair``); ``earned`` says whether an optional kernel (one with a
Python equivalent) is worth compiling yet.  ``run`` and ``run_with`` follow the same rules, in this
order:

1. serial below ``_config.PARALLEL_MIN_ELEMENTS``, and in a child forked after
   OpenMP started;
2. the policy ``_config.THREADS`` (``FASTCLIP_THREADS``): ``"serial"``,
   ``"parallel"``, or ``"auto"``, which runs serially while parallel launches
   are measured slower than serial ones (``_policy.Backoff``: other processes
   or another thread pool hold the cores);
3. a lock around parallel launches until the threading layer is known (and
   always under ``workqueue``); a thread that cannot take it runs serially.

Why a back-off rather than a different layer or wait policy, measured on the
2-core machine with two busy processes (``python benchmarks/bench_busy.py
--rounds 21``; median / 90th percentile of ``clip_by_norm_`` of 1e6 float32,
NumPy's serial clip 0.94 ms in the same runs): ``omp`` as shipped 51 / 64 ms;
``OMP_WAIT_POLICY=PASSIVE`` (which also changes torch's pool) 1.08 / 31 ms;
``workqueue`` 1.25 / 4.5 ms; serial (``NUMBA_NUM_THREADS=1``) 1.05 / 1.12 ms.
Only serial work is immune to a descheduled worker.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import _config as cfg
from . import _build
from ._policy import Backoff, check_mode


class _ThreadState:
    """What we know about numba's threading layer (see ``run``)."""

    layer: str | None = None  # known after the first parallel launch
    serial_only = False  # set in a child forked after OpenMP started
    lock = threading.Lock()
    backoff = Backoff()


_state = _ThreadState()


def _after_fork_in_child() -> None:
    # GNU OpenMP kills a forked child that starts a parallel region when the
    # parent already had one (tests/routes/test_threads_fork.py,
    # test_fork_after_a_parallel_kernel).  Serial kernels are safe there.
    if _state.layer == "omp":
        _state.serial_only = True
    _state.lock = threading.Lock()
    _state.backoff = Backoff()  # the parent's lock may be held; its timings are the parent's


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_SERIAL: dict[str, Any] = {}  # name -> serial dispatcher (a dict lookup is the hot path)


def run(name: str, n: int, *args: Any) -> Any:
    """Run kernel ``name`` on ``n`` elements, serial below the threshold.

    The ``workqueue`` layer aborts the process when two Python threads enter
    parallel regions at once (numbagg's ``_is_in_unsafe_thread_pool`` has the
    story), so until the layer is known, and always under ``workqueue``, a
    parallel launch holds a lock; a thread that cannot take it runs the serial
    kernel instead of waiting.  ``omp`` and ``tbb`` are thread-safe.
    """
    if n < cfg.PARALLEL_MIN_ELEMENTS or _state.serial_only:
        return run_serial(name, *args)
    return _launch(name, functools.partial(_build.kernel, name), n, args)


def run_serial(name: str, *args: Any) -> Any:
    """Run kernel ``name`` serially, whatever the threshold (bookkeeping kernels)."""
    serial = _SERIAL.get(name)
    if serial is None:
        serial = _SERIAL[name] = _build.kernel(name, False)
    return serial(*args)


_ASKED: dict[str, int] = {}  # name -> times ``earned`` said "not yet"


def earned(name: str) -> bool:
    """Whether the serial kernel ``name``, a per-call speed-up that has a
    Python equivalent, may run now: it is loaded in this process, or cached
    on disk, or it was asked for more than ``cfg.OPTIONAL_KERNEL_AFTER_CALLS``
    times (then it is compiled).  A call told "not yet" takes the Python way.
    """
    serial = _SERIAL.get(name)
    if serial is not None and serial.overloads:
        return True
    asked = _ASKED.get(name, 0) + 1
    if asked > cfg.OPTIONAL_KERNEL_AFTER_CALLS:
        return True
    if _build.on_disk(_build.kernel(name, False)):
        return True
    _ASKED[name] = asked
    return False


def run_with(kernel_for: Callable[[bool], Any], n: int, *args: Any) -> Any:
    """``run`` for kernels of other modules: ``kernel_for(parallel)`` gives the
    serial or the parallel dispatcher; same threshold, fork and lock rules."""
    if n < cfg.PARALLEL_MIN_ELEMENTS or _state.serial_only:
        return kernel_for(False)(*args)
    return _launch(kernel_for, kernel_for, n, args)


def decide(key: Any, n: int, now_ns: int) -> bool:
    """Whether a launch of ``key`` on ``n`` elements would run in parallel now.

    The rules of ``run`` (threshold, fork, ``cfg.THREADS``, the back-off),
    without launching anything; raises ValueError for an unknown policy.
    """
    if n < cfg.PARALLEL_MIN_ELEMENTS or _state.serial_only:
        return False
    mode = cfg.THREADS
    if mode == "auto":
        return _state.backoff.parallel(key, n, now_ns)
    return check_mode(mode) == "parallel"


def _launch(key: Any, kernel_for: Callable[[bool], Any], n: int, args: tuple[Any, ...]) -> Any:
    mode = cfg.THREADS
    if mode != "auto":
        if check_mode(mode) == "parallel":
            return _run_parallel(kernel_for, args)[0]
        return kernel_for(False)(*args)
    backoff = _state.backoff
    start = time.perf_counter_ns()
    if backoff.parallel(key, n, start):
        result, ran_parallel = _run_parallel(kernel_for, args)
    else:
        dispatcher, ran_parallel = kernel_for(False), False
        compiled = len(dispatcher.overloads)
        result = dispatcher(*args)
        if len(dispatcher.overloads) != compiled:
            return result  # this call compiled (or loaded) the kernel: not a serial rate
    end = time.perf_counter_ns()
    if ran_parallel is not None:
        backoff.record(key, n, ran_parallel, start, end)
    return result


def _run_parallel(kernel_for: Callable[[bool], Any], args: tuple[Any, ...]) -> tuple[Any, Any]:
    """The result, and True if it ran in parallel, False if serially (the lock was
    taken), None if the call compiled its kernel (its time says nothing)."""
    layer = _state.layer
    if layer is not None and layer != "workqueue":
        return _timed_call(kernel_for(True), args)
    lock = _state.lock
    if not lock.acquire(blocking=False):
        return kernel_for(False)(*args), None
    try:
        result, ran = _timed_call(kernel_for(True), args)
        if layer is None:
            import numba

            _state.layer = numba.threading_layer()
            ran = None  # the first launch also started the thread pool
        return result, ran
    finally:
        lock.release()


def _timed_call(dispatcher: Any, args: tuple[Any, ...]) -> tuple[Any, bool | None]:
    compiled = len(dispatcher.overloads)
    result = dispatcher(*args)
    return result, (True if len(dispatcher.overloads) == compiled else None)


def threading_layer() -> str | None:
    return _state.layer


def policy() -> str:
    """The thread policy in force, in words (``fastclip info``)."""
    mode = cfg.THREADS
    if mode not in ("auto", "parallel", "serial"):
        return f"invalid: {mode!r} (FASTCLIP_THREADS / fastclip._config.THREADS)"
    head = f"{mode}: serial below {cfg.PARALLEL_MIN_ELEMENTS:,} elements"
    if _state.serial_only:
        return head + "; serial only (a child forked after OpenMP started)"
    if mode == "serial":
        return "serial: every kernel runs on one thread"
    if mode == "parallel":
        return head + ", parallel above"
    return head + "; above, " + _state.backoff.describe()
