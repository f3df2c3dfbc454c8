"""Shared fixtures: the backend matrix, hypothesis' CI profile, config patches.

Helpers live in ``_backends.py`` and the float64 oracles in ``reference.py``
(and the GPU host emulation, shared by ``api/`` and ``gpu/emulated/``, in
``_gpu_emulation.py``); this file puts the tests directory on ``sys.path`` so
test modules in every subfolder can import them under ``--import-mode=importlib``.

The folders mirror the package: ``api/`` (the public operations, on the
backend matrix), ``routes/`` (dispatch, threads, numba cache, Dask, Array API),
``gpu/`` (CUDA; ``gpu/emulated/`` runs the GPU drivers on NumPy memory),
``integration/`` (torch parity, real peers, multi-process gloo groups) and
``tooling/`` (CLI, benchmarks, docs, examples).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

from _backends import CPU, Backend, backend_params

# Deterministic for CI (SciPy does the same): the same examples every run.
settings.register_profile("fastclip-ci", derandomize=True, max_examples=40, deadline=None)
settings.register_profile("fastclip-dev", max_examples=300, deadline=None)
# The long contract-fuzzer run (tests/api/test_fuzz*.py): random, many examples.
settings.register_profile("fastclip-fuzz", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("FASTCLIP_HYPOTHESIS_PROFILE", "fastclip-ci"))


@pytest.fixture(params=backend_params())
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each backend of the matrix (GPU ones skip with a reason where none is usable)."""
    return request.param


@pytest.fixture(params=backend_params(CPU))
def cpu_backend(request: pytest.FixtureRequest) -> Backend:
    """Each CPU backend of the matrix (NumPy, read-only NumPy, torch, array-api-strict)."""
    return request.param


@pytest.fixture
def small_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MiB bandwidth probe for ``fastclip bench`` instead of 256 MiB (the
    figure is meaningless, the code path is not)."""
    from fastclip._bench import timing

    monkeypatch.setattr(timing, "HOST_PROBE_BYTES", 2**20)


@pytest.fixture
def bench_config() -> Any:
    """A factory of tiny ``fastclip bench`` configurations: one workload, one
    size, two rounds, the fastclip and NumPy backends, no progress bar;
    keyword arguments replace any field."""
    from fastclip._bench import BenchConfig

    def make(**kw: Any) -> Any:
        base: dict[str, Any] = dict(
            workloads=("single",),
            sizes=(1000,),
            repeat=2,
            backends=("fastclip", "numpy"),
            progress=False,
        )
        base.update(kw)
        return BenchConfig(**base)

    return make


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the multi-chunk, multi-block and parallel kernels on small data."""
    import fastclip._config as cfg

    monkeypatch.setattr(cfg, "CHUNK", 7)
    monkeypatch.setattr(cfg, "COL_TILE", 3)
    monkeypatch.setattr(cfg, "PARALLEL_MIN_ELEMENTS", 0)


@pytest.fixture(autouse=True, scope="session")
def _parallel_kernels_where_parallel_is_asked() -> Any:
    """Launches above the threshold run the parallel twins, as tests that patch
    ``PARALLEL_MIN_ELEMENTS`` small expect: the default ``auto`` policy would
    run a size class's first launch serially and back off to serial on a busy
    CI machine, so which twin a test exercised would depend on the load.  The
    ``auto`` policy itself is tested in ``routes/test_launch_policy.py``."""
    from fastclip import _config as cfg

    before = cfg.THREADS
    cfg.THREADS = "parallel"
    yield
    cfg.THREADS = before
