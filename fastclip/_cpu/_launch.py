"""Running the kernels: serial below a size threshold, parallel above it.

``run`` / ``run_serial`` launch a kernel of the kernel modules by name
(``_build.kernel``); ``run_with`` launches any serial/parallel pair
(``_build.jit_pair``).  All three follow the same rules: serial below
``_config.PARALLEL_MIN_ELEMENTS`` and in a child forked after OpenMP started,
and a lock around parallel launches until the threading layer is known (and
always under ``workqueue``).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

from .. import _config as cfg
from . import _build


class _ThreadState:
    """What we know about numba's threading layer (see ``run``)."""

    layer: str | None = None  # known after the first parallel launch
    serial_only = False  # set in a child forked after OpenMP started
    lock = threading.Lock()


_state = _ThreadState()


def _after_fork_in_child() -> None:
    # GNU OpenMP kills a forked child that starts a parallel region when the
    # parent already had one (tests/routes/test_threads_fork.py,
    # test_fork_after_a_parallel_kernel).  Serial kernels are safe there.
    if _state.layer == "omp":
        _state.serial_only = True
    _state.lock = threading.Lock()


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
    return _run_parallel(functools.partial(_build.kernel, name), args)


def run_serial(name: str, *args: Any) -> Any:
    """Run kernel ``name`` serially, whatever the threshold (bookkeeping kernels)."""
    serial = _SERIAL.get(name)
    if serial is None:
        serial = _SERIAL[name] = _build.kernel(name, False)
    return serial(*args)


def run_with(kernel_for: Callable[[bool], Any], n: int, *args: Any) -> Any:
    """``run`` for kernels of other modules: ``kernel_for(parallel)`` gives the
    serial or the parallel dispatcher; same threshold, fork and lock rules."""
    if n < cfg.PARALLEL_MIN_ELEMENTS or _state.serial_only:
        return kernel_for(False)(*args)
    return _run_parallel(kernel_for, args)


def _run_parallel(kernel_for: Callable[[bool], Any], args: tuple[Any, ...]) -> Any:
    layer = _state.layer
    if layer is not None and layer != "workqueue":
        return kernel_for(True)(*args)
    lock = _state.lock
    if not lock.acquire(blocking=False):
        return kernel_for(False)(*args)
    try:
        result = kernel_for(True)(*args)
        if layer is None:
            import numba

            _state.layer = numba.threading_layer()
        return result
    finally:
        lock.release()


def threading_layer() -> str | None:
    return _state.layer
