"""fastclip.clip_by_norm (new array) and clip_by_norm_ (in place, returns the norms before).

This file owns clip_by_norm and clip_by_norm_ on the backend matrix; the zero-norm rule
is in test_zero_norm_rule.py, bad arguments in test_bad_input.py, the Dask route in
tests/routes/test_dask.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from _backends import CPU, ORDS, WRITEABLE, Backend, assert_close, norm_dtype, params, sample

import fastclip

AXES = [None, 0, -1, (0, 1), (1, 2), (0, 2), (0, 1, 2)]
# Slices with very different norms, so one max_norm clips some and leaves others.
SCALES = np.array([0.01, 0.3, 1.0, 5.0]).reshape(4, 1, 1)
MAX_NORM = 2.0


def _data(shape=(4, 5, 6), seed=0):
    return sample(shape, seed=seed) * SCALES[: shape[0]].reshape((-1,) + (1,) * (len(shape) - 1))


def _expected(backend, x, dtype, ord, axis, max_norm=MAX_NORM, eps=1e-6):
    x64 = backend.to_numpy(x)
    out = ref.clip_by_norm(x64, max_norm, ord, axis=axis, eps=eps)
    if dtype in ("float16", "bfloat16"):
        out = backend.round_to(out, dtype)
    norms = ref.norm(x64, ord, axis=axis)
    return out, norms


@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params())
def test_clip_by_norm_out_of_place(backend, dtype, ord, axis):
    x = backend.asarray(_data(), dtype)
    before = backend.to_numpy(x)
    expected, _ = _expected(backend, x, dtype, ord, axis)
    got = fastclip.clip_by_norm(x, MAX_NORM, ord, axis=axis)
    backend.assert_array(got, x, dtype, tuple(x.shape))
    assert_close(backend.to_numpy(got), expected, dtype)
    np.testing.assert_array_equal(backend.to_numpy(x), before)  # input untouched


@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(WRITEABLE))
def test_clip_by_norm_in_place_returns_norms_before(backend, dtype, ord, axis):
    x = backend.asarray(_data(), dtype)
    expected, norms = _expected(backend, x, dtype, ord, axis)
    got = fastclip.clip_by_norm_(x, MAX_NORM, ord, axis=axis)
    backend.assert_array(got, x, norm_dtype(dtype), norms.shape)
    assert_close(backend.to_numpy(got), norms, norm_dtype(dtype))
    assert_close(backend.to_numpy(x), expected, dtype)


@pytest.mark.parametrize("axis", [None, 0, (0, 1)], ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["complex64", "complex128"]))
def test_clip_by_norm_complex(backend, dtype, axis):
    x = backend.asarray(sample((3, 4), seed=1, kind="complex"), dtype)
    for ord in ORDS:
        got = fastclip.clip_by_norm(x, 1.5, ord, axis=axis)
        backend.assert_array(got, x, dtype, (3, 4))
        expected = ref.clip_by_norm(backend.to_numpy(x), 1.5, ord, axis=axis)
        assert_close(backend.to_numpy(got), expected, dtype)


@pytest.mark.parametrize("axis", [None, 1], ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(CPU))
def test_under_threshold_is_bit_exact(backend, dtype, axis):
    """norm + eps <= max_norm makes the coefficient exactly 1: output == input."""
    x = backend.asarray(sample((3, 8), seed=2) * 0.01, dtype)
    before = backend.to_numpy(x)
    assert ref.norm(before, 2).item() + 1e-6 < 1.0
    np.testing.assert_array_equal(
        backend.to_numpy(fastclip.clip_by_norm(x, 1.0, axis=axis)), before
    )
    np.testing.assert_array_equal(backend.to_numpy(fastclip.clip_by_norm(x, math.inf)), before)
    if backend.writeable:
        fastclip.clip_by_norm_(x, 1.0, axis=axis)
        np.testing.assert_array_equal(backend.to_numpy(x), before)


@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["float32", "float64"]))
def test_max_norm_zero_eps_zero_and_array_max_norm(backend, dtype):
    x = backend.asarray(np.array([[3.0, 4.0], [0.3, 0.4]]), dtype)
    assert_close(backend.to_numpy(fastclip.clip_by_norm(x, 0.0)), np.zeros((2, 2)), dtype)
    got = fastclip.clip_by_norm(x, 1.0, axis=1, eps=0.0)
    assert_close(backend.to_numpy(got), np.array([[0.6, 0.8], [0.3, 0.4]]), dtype)
    c = np.asarray(1.0) if not backend.is_torch else backend.module().tensor(1.0)
    got = fastclip.clip_by_norm(x, c, axis=1, eps=0.0)  # a 0-d array as max_norm
    assert_close(backend.to_numpy(got), np.array([[0.6, 0.8], [0.3, 0.4]]), dtype)


# ------------------------------------------------------------- non-finite


@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(
    ("backend", "dtype"), params(CPU, ["bfloat16", "float16", "float32", "float64"])
)
def test_nan_and_inf_propagate(backend, dtype, ord):
    data = sample((3, 4), seed=3)
    data[1, 1] = np.nan
    data[2, 2] = np.inf
    x = backend.asarray(data, dtype)
    whole = backend.to_numpy(fastclip.clip_by_norm(x, 1.0, ord))
    assert np.isnan(whole).all()  # a NaN norm makes every output NaN, as torch
    rows = backend.to_numpy(fastclip.clip_by_norm(x, 1.0, ord, axis=1))
    expected = ref.clip_by_norm(backend.to_numpy(x), 1.0, ord, axis=1)
    assert_close(rows, expected, dtype)  # row 1 NaN; row 2: inf norm -> zeros and one NaN
    assert np.isnan(rows[1]).all() and np.isnan(rows[2, 2]) and (rows[2, [0, 1, 3]] == 0).all()


# ---------------------------------------------------------------- layouts


def _numpy_views():
    base = lambda: np.array(sample((6, 8), seed=4) * 3, np.float32)  # noqa: E731
    yield "strided", base, lambda a: a[:, ::2]
    yield "transposed", base, lambda a: a.T
    yield "offset", base, lambda a: a[1:, 3:]
    yield "reversed", base, lambda a: a[::-1, ::-3]
    yield "fortran", lambda: np.asfortranarray(base()), lambda a: a
    yield "fortran-3d", lambda: np.asfortranarray(sample((3, 4, 5), seed=5)), lambda a: a


@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 1)], ids=str)
@pytest.mark.parametrize("name", [v[0] for v in _numpy_views()])
def test_in_place_on_numpy_views_writes_caller_memory(name, axis):
    make_base, view_of = next((b, v) for n, b, v in _numpy_views() if n == name)
    base = make_base()
    view = view_of(base)
    outside = base.copy()
    mask = np.zeros(base.shape, bool)
    view_of(mask)[...] = True  # elements that belong to the view
    expected = ref.clip_by_norm(view, 2.0, axis=axis)
    norms = fastclip.clip_by_norm_(view, 2.0, axis=axis)
    assert_close(norms, ref.norm(view_of(outside), axis=axis), str(base.dtype))
    assert_close(view, expected, str(base.dtype))
    np.testing.assert_array_equal(base[~mask], outside[~mask])  # nothing outside the view moved


@pytest.mark.parametrize("axis", [None, 0, 1], ids=str)
@pytest.mark.parametrize("name", ["strided", "transposed", "offset", "grad", "grad-strided"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_in_place_on_torch_tensors_writes_caller_memory(name, dtype, axis):
    import torch

    data = torch.tensor(sample((6, 8), seed=6) * 3, dtype=getattr(torch, dtype))
    view_of = {
        "strided": lambda t: t[:, ::2],
        "transposed": lambda t: t.T,
        "offset": lambda t: t[1:, 3:],
        "grad": lambda t: t,
        "grad-strided": lambda t: t[:, ::2],
    }[name]
    if name.startswith("grad"):
        p = torch.nn.Parameter(torch.zeros(6, 8, dtype=data.dtype))
        p.grad = data
        base = p.grad  # the caller's .grad tensor itself
    else:
        base = data
    outside = base.clone()
    mask = torch.zeros(6, 8, dtype=torch.bool)
    view_of(mask)[...] = True  # elements that belong to the view
    target = view_of(base)
    expected = ref.clip_by_norm(Backend.TORCH.to_numpy(target), 2.0, axis=axis)
    if dtype in ("float16", "bfloat16"):
        expected = Backend.TORCH.round_to(expected, dtype)
    fastclip.clip_by_norm_(target, 2.0, axis=axis)
    assert_close(Backend.TORCH.to_numpy(view_of(base)), expected, dtype)  # through the base
    assert torch.equal(base[~mask], outside[~mask])  # nothing outside the view moved
    if name.startswith("grad"):
        assert p.grad is base


# ------------------------------------------------ multi-chunk / parallel paths


@pytest.mark.parametrize("axis", [None, 0, 1], ids=str)
@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(
    ("backend", "dtype"),
    params([Backend.NUMPY, Backend.TORCH], ["bfloat16", "float16", "float32", "float64"]),
)
def test_clip_by_norm_small_chunks(small_chunks, backend, dtype, ord, axis):
    x = backend.asarray(_data((4, 13, 3), seed=7), dtype)
    expected, norms = _expected(backend, x, dtype, ord, axis)
    assert_close(
        backend.to_numpy(fastclip.clip_by_norm(x, MAX_NORM, ord, axis=axis)), expected, dtype
    )
    got = fastclip.clip_by_norm_(x, MAX_NORM, ord, axis=axis)
    assert_close(backend.to_numpy(got), norms, norm_dtype(dtype))
    assert_close(backend.to_numpy(x), expected, dtype)


def test_clip_by_norm_large_parallel_array():
    """Above PARALLEL_MIN_ELEMENTS with the default chunking, out of place and in place."""
    x = np.array(sample(300_001, seed=8), np.float32)
    expected = ref.clip_by_norm(x, 10.0)
    assert_close(fastclip.clip_by_norm(x, 10.0), expected, "float32")
    assert_close(
        fastclip.clip_by_norm_(x, 10.0),
        ref.norm(sample(300_001, seed=8).astype(np.float32)),
        "float32",
    )
    assert_close(x, expected, "float32")


@pytest.mark.parametrize("inplace", [False, True], ids=["new", "in-place"])
@pytest.mark.parametrize("ord", [1, 2, math.inf], ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(CPU, ["bfloat16", "float16", "float32"]))
def test_fused_rows_clip_is_the_two_launch_result_bit_for_bit(
    backend, dtype, ord, inplace, monkeypatch
):
    """Per-row clipping of contiguous rows takes one fused kernel (``rows_clip``): the
    same values, bit for bit, as the norms-then-scale launches it replaces, and the
    float64 oracle's. Rows cover zero, NaN, inf, clipped and unclipped rows, and
    sizes above the parallel threshold."""
    from fastclip._cpu import _axes

    if inplace and not backend.writeable:
        pytest.skip("read-only backend")
    data = sample((40, 9000), seed=11)
    data[0] = 0.0
    data[1, 3] = np.nan
    data[2, 5] = np.inf
    data[3] *= 1e-3  # below the bound: left as is
    c = float(np.median(np.linalg.norm(data[4:], ord, axis=1)))  # half the rows clipped
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(_axes.AxisPlan, "fused_clip", lambda *a, **k: None)
        x = backend.asarray(data, dtype)
        if inplace:
            norms, out = fastclip.clip_by_norm_(x, c, ord, axis=1), x
        else:
            out = fastclip.clip_by_norm(x, c, ord, axis=1)
            norms = fastclip.norm(x, ord, axis=1)
        results.append((backend.to_numpy(out), backend.to_numpy(norms)))
    (out_f, norms_f), (out_u, norms_u) = results
    np.testing.assert_array_equal(out_f, out_u)
    np.testing.assert_array_equal(norms_f, norms_u)
    before = backend.to_numpy(backend.asarray(data, dtype)).astype(np.float64)
    expected = backend.round_to(ref.clip_by_norm(before, c, ord, axis=1), dtype)
    assert_close(out_f, expected, dtype)
