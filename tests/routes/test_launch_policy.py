"""The CPU route's serial/parallel decision (``_cpu/_launch.py``, ``_cpu/_policy.py``).

Timings are injected (``Backoff.record`` with chosen nanoseconds), so nothing
here depends on the machine's speed; results are checked against the float64
oracles of ``tests/reference.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import reference as ref

import fastclip
import fastclip._config as cfg
from fastclip._cpu import _launch
from fastclip._cpu._policy import Backoff

MS = 1_000_000  # ns
N = 1 << 20  # above the threshold; size class 21


@pytest.fixture
def fresh(monkeypatch):
    """A fresh back-off state and the documented defaults, restored afterwards."""
    monkeypatch.setattr(cfg, "THREADS", "auto")
    monkeypatch.setattr(cfg, "BACKOFF_MIN_MS", 50.0)
    monkeypatch.setattr(cfg, "BACKOFF_MAX_MS", 400.0)
    monkeypatch.setattr(cfg, "CONTENTION_RATIO", 1.25)
    monkeypatch.setattr(cfg, "CONTENTION_STRIKES", 2)
    monkeypatch.setattr(_launch._state, "serial_only", False)
    monkeypatch.setattr(_launch._state, "backoff", Backoff())
    return _launch._state.backoff


def test_first_launch_of_a_size_class_is_serial_then_parallel(fresh):
    assert not _launch.decide("k", N, 0)  # no serial rate yet
    fresh.record("k", N, False, 0, N)  # 1 ns per element, serially
    assert _launch.decide("k", N, 10)
    assert not _launch.decide("k", 4 * N, 10)  # another size class: its own serial probe
    assert not _launch.decide("other", N, 10)  # another kernel too


def test_slow_parallel_backs_off_doubles_and_resets(fresh):
    fresh.record("k", N, False, 0, N)
    fresh.record("k", N, True, 0, int(1.2 * N))  # 1.2x serial: within the ratio
    assert _launch.decide("k", N, 2 * N)
    t = 10 * MS
    fresh.record("k", N, True, t - 2 * N, t)  # 2x serial: one strike, still parallel
    assert _launch.decide("k", N, t + 1)
    fresh.record("k", N, True, t - 2 * N, t)  # the second in a row: contention
    assert not _launch.decide("k", N, t + 49 * MS)  # serial for BACKOFF_MIN_MS
    assert _launch.decide("k", N, t + 50 * MS)  # then one parallel probe
    t += 50 * MS
    fresh.record("k", N, True, t - 50 * N, t)  # one slow probe suffices: 100 ms now
    assert not _launch.decide("k", N, t + 99 * MS)
    assert _launch.decide("k", N, t + 100 * MS)
    for _ in range(5):  # doubling stops at BACKOFF_MAX_MS
        t += 1000 * MS
        fresh.record("k", N, True, t - 50 * N, t)
    assert fresh.length_ms == 400.0
    assert not _launch.decide("k", N, t + 399 * MS) and _launch.decide("k", N, t + 400 * MS)
    t += 400 * MS
    fresh.record("k", N, True, t - N // 2, t)  # a fast probe: back to the first length
    assert fresh.length_ms == 50.0 and _launch.decide("k", N, t + 1)
    assert fresh.backoffs == 7
    fresh.record("k", N, True, t, t + 2 * N)  # after a fast launch: two strikes again
    assert _launch.decide("k", N, t + 2 * N + 1)


def test_with_one_strike_one_slow_launch_backs_off(fresh, monkeypatch):
    monkeypatch.setattr(cfg, "CONTENTION_STRIKES", 1)  # the shipped value
    fresh.record("k", N, False, 0, N)
    fresh.record("k", N, True, 0, 2 * N)
    assert not _launch.decide("k", N, 2 * N + 1) and fresh.backoffs == 1


def test_a_fast_launch_between_slow_ones_clears_the_strike(fresh):
    fresh.record("k", N, False, 0, N)
    for _ in range(3):
        fresh.record("k", N, True, 0, 3 * N)  # slow
        fresh.record("k", N, True, 0, N // 2)  # fast
    assert fresh.backoffs == 0 and _launch.decide("k", N, 1)


def test_serial_rate_falls_at_once_and_rises_halfway(fresh):
    fresh.record("k", N, False, 0, 4 * N)
    fresh.record("k", N, False, 0, 2 * N)  # faster: taken as is
    assert fresh.serial_ns[("k", N.bit_length())] == 2.0
    fresh.record("k", N, False, 0, 6 * N)  # slower (a costlier variant): halfway
    assert fresh.serial_ns[("k", N.bit_length())] == 4.0
    fresh.record("k", N, True, 0, int(4.9 * N))  # 1.225x of 4.0: no back-off
    assert fresh.backoffs == 0


def test_threshold_fork_rule_and_forced_policies(fresh, monkeypatch):
    fresh.record("k", N, False, 0, N)
    assert not _launch.decide("k", cfg.PARALLEL_MIN_ELEMENTS - 1, 0)
    monkeypatch.setattr(cfg, "THREADS", "serial")
    assert not _launch.decide("k", N, 0)
    monkeypatch.setattr(cfg, "THREADS", "parallel")
    fresh.until_ns = 10**18  # a back-off does not apply to a forced policy
    assert _launch.decide("k", N, 0) and _launch.decide("never-seen", N, 0)
    monkeypatch.setattr(_launch._state, "serial_only", True)  # a child forked after OpenMP
    assert not _launch.decide("k", N, 0)
    assert "serial only" in _launch.policy()


@pytest.mark.parametrize("mode", ["auto", "parallel", "serial"])
def test_each_policy_gives_the_oracle(fresh, monkeypatch, mode):
    monkeypatch.setattr(cfg, "THREADS", mode)
    rng = np.random.default_rng(1)
    base = rng.standard_normal(3 * cfg.PARALLEL_MIN_ELEMENTS + 5).astype(np.float32)
    want = ref.clip_by_norm(base, 7.0)
    for _ in range(3):  # auto: serial probe, then parallel
        x = base.copy()
        fastclip.clip_by_norm_(x, 7.0)
        np.testing.assert_allclose(x.astype(np.float64), want, rtol=1e-6)
    assert _launch.policy().startswith(mode)


def test_unknown_policy_raises_before_writing(fresh, monkeypatch):
    monkeypatch.setattr(cfg, "THREADS", "fast")
    x = np.full(cfg.PARALLEL_MIN_ELEMENTS + 1, 3.0, np.float32)
    with pytest.raises(ValueError, match="auto, parallel, serial"):
        fastclip.clip_by_norm_(x, 1.0)
    assert np.all(x == 3.0)
    with pytest.raises(ValueError, match="FASTCLIP_THREADS"):
        fastclip.clip_by_global_norm_([x, x[:10].copy()], 1.0)
    assert np.all(x == 3.0)
    assert _launch.policy().startswith("invalid")


def test_two_threads_at_once_learn_and_stay_right(fresh):
    rng = np.random.default_rng(2)
    bases = [rng.standard_normal(2 * cfg.PARALLEL_MIN_ELEMENTS).astype(np.float32) for _ in "ab"]
    wants = [ref.clip_by_norm(b, 5.0) for b in bases]
    errors: list[str] = []

    def worker(k: int) -> None:
        for i in range(20):
            x = bases[k].copy()
            fastclip.clip_by_norm_(x, 5.0)
            if not np.allclose(x.astype(np.float64), wants[k], rtol=1e-6):
                errors.append(f"thread {k} call {i}")
            # and the state's updates from both threads at once (injected times)
            fresh.record(("t", k), N, i % 2 == 1, 0, N * (1 + i % 2))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert fresh.serial_ns[(("t", 0), N.bit_length())] == 1.0
    assert fresh.serial_ns[(("t", 1), N.bit_length())] == 1.0


@pytest.mark.parametrize("mode", ["serial", "parallel", "bogus"])
def test_environment_switch_is_read_and_reported(mode):
    code = (
        "import json, fastclip, fastclip._config as c\n"
        "print(json.dumps([c.THREADS, fastclip.info()['cpu_threads']]))"
    )
    env = dict(os.environ, FASTCLIP_THREADS=mode)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    value, reported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert value == mode
    assert reported.startswith("invalid" if mode == "bogus" else mode)
