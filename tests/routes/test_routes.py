"""Routes: what `import fastclip` loads, which route each array type takes, GPU refusals,
autograd version counters, the fallback when numba's on-disk cache is unavailable, and
the CPU route's bulk-header overlap check (lists of ``FAST_HEADERS_MIN_ARRAYS`` or more).

This file owns dispatch and what only a route does; what every route must
compute is tested once per operation in ``tests/api/`` on the backend matrix,
the Dask route in ``test_dask.py``, the numba cache in ``test_numba_cache.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
from _backends import Backend, assert_close, sample, unchanged
from hypothesis import given, settings
from hypothesis import strategies as st

import fastclip
import fastclip._config
from fastclip import _dispatch
from fastclip._cpu import _headers

TIMEOUT = 240


def _run(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args, "-c", code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )


def test_import_fastclip_imports_no_framework_and_compiles_nothing():
    code = (
        "import sys, json\n"
        "import fastclip\n"
        "print(json.dumps({'loaded': [m for m in ('torch', 'cupy', 'jax', 'numba', 'llvmlite')"
        " if m in sys.modules], 'version': fastclip.__version__}))\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []  # no numba: nothing can have been compiled
    assert report["version"]


def test_numba_is_imported_on_first_use_only():
    code = (
        "import sys, numpy as np, fastclip\n"
        "assert 'numba' not in sys.modules\n"
        "print(float(fastclip.norm(np.array([3.0, 4.0], np.float32))), 'numba' in sys.modules)\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["5.0", "True"]


def test_info_reports_routes():
    report = fastclip.info()
    routes = report["routes"]
    assert routes["numpy.ndarray"] == "numba-cpu"
    assert routes["torch.Tensor (cpu)"] == "numba-cpu"
    assert routes["array_api_strict.Array"] == "array-api"
    assert routes["cupy.ndarray"].startswith("cupy-gpu")
    assert routes["torch.Tensor (cuda)"].startswith("cupy-gpu")
    for route in routes.values():  # each thing said once: at most one parenthesis
        assert route.count("(") <= 1, route
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert routes["cupy.ndarray"].endswith("needs CuPy)")
    for key in (
        "fastclip",
        "versions",
        "numba_threading_layer",
        "numba_threads",
        "numba_cache",
        "gpus",
    ):
        assert key in report
    assert report["fastclip"] == fastclip.__version__


def test_route_of_real_arrays():
    import array_api_strict as xp
    import torch

    assert _dispatch.route_of(np.ones(2)) == "numba-cpu"
    assert _dispatch.route_of(torch.ones(2)) == "numba-cpu"
    assert _dispatch.route_of(xp.ones(2)) == "array-api"
    assert _dispatch.route_of(torch.ones(2, device="meta")) == "array-api"
    with pytest.raises(TypeError):
        _dispatch.route_of([1.0, 2.0])


def _fake_cuda_tensor():
    """A real torch.Tensor subclass (torch's FakeTensor) that reports device cuda:0.

    It carries no data, but dispatch only looks at the type and the device, so
    it exercises exactly the code a CUDA tensor would reach, on a CPU-only machine.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        t = torch.empty(4, device="cuda")
    assert t.device.type == "cuda"
    return t


def _gpu_usable() -> bool:
    try:
        fastclip._dispatch.check_gpu_available()
    except fastclip.GPUUnavailableError:
        return False
    return True


@pytest.mark.skipif(_gpu_usable(), reason="CuPy and a GPU are usable: the GPU route runs instead")
def test_cuda_tensors_without_cupy_raise_instead_of_copying():
    t = _fake_cuda_tensor()
    assert _dispatch.route_of(t) == "cupy-gpu"
    for call in (
        lambda: fastclip.norm(t),
        lambda: fastclip.global_norm([t, t]),
        lambda: fastclip.clip_by_norm(t, 1.0),
        lambda: fastclip.clip_by_norm_(t, 1.0),
        lambda: fastclip.normalize_(t),
        lambda: fastclip.clip_by_value_(t, -1, 1),
        lambda: fastclip.clip_by_global_norm_([t], 1.0),
        lambda: fastclip.clip_by_global_norm([t, t], 1.0),
        lambda: fastclip.scale_([t, t], 0.5),
    ):
        with pytest.raises(fastclip.GPUUnavailableError, match="GPU route"):
            call()


def test_cupy_arrays_take_the_gpu_route():
    cupy = pytest.importorskip("cupy", reason="cupy is not installed: no CuPy route to test")
    if not cupy.is_available():
        pytest.skip("cupy.is_available() is False: no CUDA device to create a CuPy array on")
    x = cupy.full(4, 1.0, dtype=cupy.float32)
    norm = fastclip.clip_by_norm_(x, 1.0, eps=0.0)
    assert isinstance(norm, cupy.ndarray)
    np.testing.assert_allclose(float(norm), 2.0, rtol=1e-7)
    np.testing.assert_allclose(cupy.asnumpy(x), np.full(4, 0.5), rtol=1e-7)


def test_in_place_on_tensors_bumps_the_autograd_version_counter():
    import torch

    data = sample((3, 4), seed=1)
    cases = [
        (lambda t: fastclip.clip_by_norm_(t, 0.5), lambda d: ref.clip_by_norm(d, 0.5)),
        (
            lambda t: fastclip.clip_by_norm_(t, 0.5, axis=1),
            lambda d: ref.clip_by_norm(d, 0.5, axis=1),
        ),
        (lambda t: fastclip.normalize_(t), lambda d: ref.normalize(d)),
        (
            lambda t: fastclip.clip_by_value_(t, -0.2, 0.2),
            lambda d: ref.clip_by_value(d, -0.2, 0.2),
        ),
        (lambda t: fastclip.clip_by_global_norm_([t], 0.5), lambda d: ref.clip_by_norm(d, 0.5)),
        (
            lambda t: fastclip.clip_by_global_norm_([t, t.new_zeros(2)], 0.5),
            lambda d: ref.clip_by_norm(d, 0.5),
        ),
        (lambda t: fastclip.scale_([t], 0.5), lambda d: d * 0.5),
    ]
    for func, oracle in cases:
        t = torch.tensor(data, dtype=torch.float32, requires_grad=True)
        before = t._version
        with torch.no_grad():
            func(t)
        assert t._version > before
        assert_close(t.detach().double().numpy(), oracle(data.astype(np.float32)), "float32")


def test_out_of_place_keeps_the_version_counter():
    import torch

    t = torch.tensor(sample(5, seed=2), dtype=torch.float32)
    before = t._version
    out = fastclip.clip_by_norm(t, 0.1)
    assert t._version == before
    Backend.TORCH.assert_array(out, t, "float32", (5,))
    assert_close(out.double().numpy(), ref.clip_by_norm(t.double().numpy(), 0.1), "float32")


def test_unavailable_numba_cache_falls_back_with_a_warning(tmp_path):
    code = (
        "import json, warnings\n"
        "import numba.core.caching as caching\n"
        "impl = getattr(caching, '_CacheImpl', None) or caching.CacheImpl  # renamed in numba 0.6x\n"
        "impl._locator_classes = []  # no cache location can be found\n"
        "import numpy as np, fastclip\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    value = float(fastclip.norm(np.array([3.0, 4.0, 12.0], np.float32)))\n"
        "    clipped = fastclip.clip_by_norm(np.array([3.0, 4.0]), 1.0, eps=0.0).tolist()\n"
        "print(json.dumps({'value': value, 'clipped': clipped, 'cache': fastclip.info()['numba_cache'],\n"
        "    'warnings': [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["HOME"] = str(tmp_path)  # a fresh home: no ~/.cache/numba left from other runs
    proc = _run(code, "-W", "default", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["value"] == pytest.approx(13.0, rel=1e-7)
    assert report["clipped"] == pytest.approx([0.6, 0.8], rel=1e-12)
    assert any("cache" in w.lower() for w in report["warnings"]), report["warnings"]
    assert report["cache"].startswith("disabled")


def test_public_objects_name_their_public_module():
    """Docs, reprs and pickles show ``fastclip.norm``, ``fastclip.optim.adamw_step_``,
    not the private module a function lives in (the package layout may change)."""
    import importlib
    import pickle

    import fastclip
    import fastclip.optim

    for module in (fastclip, fastclip.optim):
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not isinstance(obj, type(fastclip)):
                public = obj.__module__  # e.g. fastclip.AGC is fastclip.adaptive.AGC
                assert not any(part.startswith("_") for part in public.split(".")), (name, public)
                assert getattr(importlib.import_module(public), name) is obj
                assert pickle.loads(pickle.dumps(obj)) is obj


# ------------------------------ the CPU route's bulk-header overlap check


def _slices_overlap(bounds):
    """Brute-force oracle: do two non-empty [lo, hi) element ranges intersect?"""
    live = [(lo, hi) for lo, hi in bounds if hi > lo]
    return any(
        a_lo < b_hi and b_lo < a_hi
        for k, (a_lo, a_hi) in enumerate(live)
        for b_lo, b_hi in live[k + 1 :]
    )


@settings(max_examples=150, deadline=None)
@given(
    bounds=st.lists(
        st.tuples(st.integers(0, 200), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1])),
        min_size=fastclip._config.FAST_HEADERS_MIN_ARRAYS,
        max_size=40,
    ),
    order=st.sampled_from(["as drawn", "sorted", "reversed"]),
)
def test_overlap_check_of_the_bulk_header_path_matches_brute_force(bounds, order):
    """Slices of one buffer, in any order: the kernel's disjointness check (an
    insertion sort that gives up on scrambled orders) raises exactly when two
    slices share an element, and clips correctly otherwise."""
    if order != "as drawn":
        bounds = sorted(bounds, reverse=order == "reversed")
    buf = np.array(sample(212, seed=63), np.float32)
    views = [buf[lo:hi] for lo, hi in bounds]
    if _slices_overlap(bounds):
        with unchanged(buf), pytest.raises(ValueError, match="share memory"):
            fastclip.clip_by_global_norm_(views, 0.1)
    else:
        expected, total = ref.clip_by_global_norm([v.copy() for v in views], 0.1)
        got = fastclip.clip_by_global_norm_(views, 0.1)
        assert_close(got, total, "float32")
        for v, e in zip(views, expected):
            assert_close(v, e, "float32")


def test_many_disjoint_arrays_in_descending_address_order_are_accepted():
    """An order the kernel's insertion sort gives up on falls back to the NumPy sort."""
    buf = np.array(sample(3_000, seed=64), np.float32)
    views = [buf[i : i + 10] for i in range(0, 3_000, 10)][::-1]
    disjoint = _headers.read_headers(views, views[0].dtype, True)[4]
    assert not disjoint  # the kernel gave up: this exercises the NumPy sort
    expected, total = ref.clip_by_global_norm([v.copy() for v in views], 0.1)
    got = fastclip.clip_by_global_norm_(views, 0.1)
    assert_close(got, total, "float32")
    for v, e in zip(views, expected):
        assert_close(v, e, "float32")
    views.append(buf[5:15])  # overlaps two of them
    with unchanged(buf), pytest.raises(ValueError, match="share memory"):
        fastclip.clip_by_global_norm_(views, 0.1)


def test_jax_without_x64_takes_the_generic_route_without_warnings():
    """JAX's default (x64 off) truncates float64/int64 requests with a UserWarning:
    the generic route computes in float32/int32 there, silently and correctly."""
    jax = pytest.importorskip("jax")
    import warnings

    import jax.numpy as jnp

    if jax.config.read("jax_enable_x64"):
        pytest.skip("this process enabled JAX's x64")
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 5)).astype(np.float32)
    w = rng.normal(size=(6, 5)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, total = fastclip.AGC(0.01).clip([jnp.asarray(g)], [jnp.asarray(w)])
        res = fastclip.clip_per_sample(jnp.asarray(g), 1.0)
    ref_out, ref_total = fastclip.AGC(0.01).clip([g.copy()], [w])
    np.testing.assert_allclose(np.asarray(out[0]), ref_out[0], rtol=1e-6)
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-6)
    ref = fastclip.clip_per_sample(g, 1.0)
    np.testing.assert_allclose(np.asarray(res.grads), ref.grads, rtol=1e-5, atol=1e-6)
    assert res.n_clipped == ref.n_clipped
