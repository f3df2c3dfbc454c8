"""fastclip.clip_by_global_norm ((new arrays, total)) and clip_by_global_norm_ (returns total).

This file owns clip_by_global_norm and clip_by_global_norm_ (total_norm=,
error_if_nonfinite=, mixed dtypes, views) on the backend matrix; the zero-norm rule is
in test_zero_norm_rule.py, the bulk-header path's overlap check in
tests/routes/test_routes.py, torch.nn.utils parity in
tests/integration/test_torch_parity.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from _backends import CPU, ORDS, WRITEABLE, Backend, assert_close, norm_dtype, params, sample

import fastclip
import fastclip._config
import fastclip._cpu._pack

FAST = fastclip._config.FAST_HEADERS_MIN_ARRAYS  # lists this long take the bulk-header path
FEW = fastclip._cpu._pack._FEW_TENSORS  # torch lists up to this long: Python-list headers
SHAPES = [(3, 4), (5,), (2, 3, 2), (0, 4), (1,)]


def _arrays(backend, dtypes, seed=0, shapes=SHAPES, scale=1.0):
    return [
        backend.asarray(sample(shapes[i % len(shapes)], seed=seed + i, scale=scale), d)
        for i, d in enumerate(dtypes)
    ]


def _expected(backend, arrays, max_norm, ord, **kw):
    x64 = [backend.to_numpy(a) for a in arrays]
    outs, total = ref.clip_by_global_norm(x64, max_norm, ord, **kw)
    dts = [str(a.dtype).replace("torch.", "").replace("array_api_strict.", "") for a in arrays]
    outs = [
        backend.round_to(o, d) if d in ("float16", "bfloat16") else o for o, d in zip(outs, dts)
    ]
    return outs, total, dts


def _result_norm_dtype(dts):
    return "float64" if "float64" in dts else "float32"


@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "unchanged"])
@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params())
def test_clip_by_global_norm_out_of_place(backend, dtype, ord, max_norm):
    arrays = _arrays(backend, [dtype] * 5)
    before = [backend.to_numpy(a) for a in arrays]
    expected, total, _ = _expected(backend, arrays, max_norm, ord)
    outs, got_total = fastclip.clip_by_global_norm(arrays, max_norm, ord)
    assert isinstance(outs, list) and len(outs) == len(arrays)
    backend.assert_array(got_total, arrays[0], norm_dtype(dtype), ())
    assert_close(backend.to_numpy(got_total), total, norm_dtype(dtype))
    for a, o, e, b in zip(arrays, outs, expected, before):
        backend.assert_array(o, a, dtype, tuple(a.shape))
        assert_close(backend.to_numpy(o), e, dtype)
        np.testing.assert_array_equal(backend.to_numpy(a), b)  # inputs untouched
    if max_norm == 1e3:  # coefficient exactly 1: bit-exact copies
        for o, b in zip(outs, before):
            np.testing.assert_array_equal(backend.to_numpy(o), b)


@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "unchanged"])
@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(("backend", "dtype"), params(WRITEABLE))
def test_clip_by_global_norm_in_place(backend, dtype, ord, max_norm):
    arrays = _arrays(backend, [dtype] * 5)
    expected, total, _ = _expected(backend, arrays, max_norm, ord)
    got_total = fastclip.clip_by_global_norm_(arrays, max_norm, ord)
    backend.assert_array(got_total, arrays[0], norm_dtype(dtype), ())
    assert_close(backend.to_numpy(got_total), total, norm_dtype(dtype))
    for a, e in zip(arrays, expected):
        assert_close(backend.to_numpy(a), e, dtype)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(
    "backend", [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT], ids=str
)
def test_mixed_dtypes_in_one_call(backend, ord, inplace):
    dtypes = [
        d
        for d in ("float32", "bfloat16", "float16", "float64", "float32")
        if d in backend.float_dtypes
    ]
    arrays = _arrays(backend, dtypes, seed=10)
    expected, total, dts = _expected(backend, arrays, 0.7, ord)
    if inplace:
        got_total = fastclip.clip_by_global_norm_(arrays, 0.7, ord)
        outs = arrays
    else:
        outs, got_total = fastclip.clip_by_global_norm(arrays, 0.7, ord)
    backend.assert_array(got_total, arrays[0], _result_norm_dtype(dts), ())
    assert_close(backend.to_numpy(got_total), total, "float32")
    for o, e, d in zip(outs, expected, dts):
        # float32 parts limit the total's accuracy, hence the coefficient's, to float32's
        assert_close(backend.to_numpy(o), e, "float32" if d == "float64" else d)


@pytest.mark.parametrize("count", sorted({1, 2, FEW, FEW + 1, FAST - 1, FAST, FAST + 1, 33}))
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    ("backend", "dtype"), params([Backend.NUMPY, Backend.TORCH], ["float32", "float64"])
)
def test_many_arrays_fast_and_slow_paths(backend, dtype, inplace, count):
    """>= FAST_HEADERS_MIN_ARRAYS plain NumPy arrays take the bulk header path."""
    shapes = [(i % 6, 3) for i in range(count)]  # includes zero-size arrays
    arrays = _arrays(backend, [dtype] * count, seed=20, shapes=shapes)
    expected, total, _ = _expected(backend, arrays, 1.0, 2)
    if inplace:
        got_total = fastclip.clip_by_global_norm_(arrays, 1.0)
        outs = arrays
    else:
        outs, got_total = fastclip.clip_by_global_norm(arrays, 1.0)
    assert_close(backend.to_numpy(got_total), total, dtype)
    for o, e in zip(outs, expected):
        assert_close(backend.to_numpy(o), e, dtype)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize(
    ("backend", "dtype"),
    params([Backend.NUMPY, Backend.TORCH], ["bfloat16", "float16", "float32", "float64"]),
)
def test_small_chunks_parallel_tables(small_chunks, backend, dtype, ord, inplace):
    shapes = [(13,), (7,), (0,), (3, 5), (1,), (29,), (2, 7), (6,), (8,), (15,)]
    arrays = _arrays(backend, [dtype] * len(shapes), seed=30, shapes=shapes)
    expected, total, _ = _expected(backend, arrays, 0.9, ord)
    if inplace:
        got_total = fastclip.clip_by_global_norm_(arrays, 0.9, ord)
        outs = arrays
    else:
        outs, got_total = fastclip.clip_by_global_norm(arrays, 0.9, ord)
    assert_close(backend.to_numpy(got_total), total, norm_dtype(dtype))
    for o, e in zip(outs, expected):
        assert_close(backend.to_numpy(o), e, dtype)


@pytest.mark.parametrize("backend", [Backend.NUMPY, Backend.TORCH], ids=str)
def test_in_place_through_views_and_grads(backend):
    if backend.is_torch:
        import torch

        base = torch.tensor(sample((6, 8), seed=40), dtype=torch.float32)
        p = torch.nn.Parameter(torch.zeros(4, 4))
        p.grad = torch.tensor(sample((4, 4), seed=41), dtype=torch.float32)
        arrays = [base[:, ::2], base[:, 1::2], p.grad, torch.ones(5, 4).T]
    else:
        base = np.array(sample((6, 8), seed=40), np.float32)
        fortran = np.asfortranarray(sample((3, 5), seed=42)).astype(np.float32, order="F")
        arrays = [base[:, ::2], base[:, 1::2], base.T[:0], fortran, np.ones((5, 4), np.float32).T]
    snapshot = [backend.to_numpy(a) for a in arrays]
    outs, total = ref.clip_by_global_norm(snapshot, 1.5)
    got = fastclip.clip_by_global_norm_(arrays, 1.5)
    assert_close(backend.to_numpy(got), total, "float32")
    for a, e in zip(arrays, outs):
        assert_close(backend.to_numpy(a), e, "float32")
    # the two interleaved halves together are all of base
    assert_close(backend.to_numpy(base)[:, ::2], outs[0], "float32")
    assert_close(backend.to_numpy(base)[:, 1::2], outs[1], "float32")
    if backend.is_torch:
        assert_close(p.grad.numpy(), outs[2], "float32")


@pytest.mark.parametrize("backend", CPU, ids=str)
def test_single_array_and_generator_inputs(backend):
    x = backend.asarray(sample((4, 5), seed=50), "float32")
    expected, total = ref.clip_by_global_norm([backend.to_numpy(x)], 1.0)
    outs, got = fastclip.clip_by_global_norm(x, 1.0)
    assert len(outs) == 1
    assert_close(backend.to_numpy(outs[0]), expected[0], "float32")
    assert_close(backend.to_numpy(got), total, "float32")
    arrays = [backend.asarray(sample(6, seed=i), "float32") for i in range(3)]
    expected, total = ref.clip_by_global_norm([backend.to_numpy(a) for a in arrays], 1.0)
    outs, got = fastclip.clip_by_global_norm((a for a in arrays), 1.0)
    assert_close(backend.to_numpy(got), total, "float32")
    for o, e in zip(outs, expected):
        assert_close(backend.to_numpy(o), e, "float32")


@pytest.mark.parametrize("backend", CPU, ids=str)
def test_the_same_array_twice_out_of_place(backend):
    """Out of place, an array may appear twice: both outputs are its clipped copy
    (the norm counts it twice) and the input is not written."""
    x = backend.asarray(sample((3, 4), seed=9), "float32")
    before = backend.to_numpy(x)
    outs, total = fastclip.clip_by_global_norm([x, x], 0.1)
    expected, expected_total = ref.clip_by_global_norm([before, before], 0.1)
    assert_close(backend.to_numpy(total), expected_total, "float32")
    for o, e in zip(outs, expected):
        backend.assert_array(o, x, "float32", (3, 4))
        assert_close(backend.to_numpy(o), e, "float32")
    np.testing.assert_array_equal(backend.to_numpy(x), before)


def test_empty_list():
    outs, total = fastclip.clip_by_global_norm([], 1.0)
    assert outs == [] and float(total) == 0.0
    assert float(fastclip.clip_by_global_norm_([], 1.0)) == 0.0


# --------------------------------------------------------------- total_norm=


@pytest.mark.parametrize("given", [0.5, 3.0, 40.0, "array"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    "backend", [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT], ids=str
)
def test_total_norm_argument_replaces_the_computed_norm(backend, inplace, given):
    arrays = _arrays(backend, ["float32"] * 3, seed=60)
    value = 7.5 if given == "array" else given
    total_arg = (
        (np.asarray(7.5) if not backend.is_torch else backend.module().tensor(7.5))
        if given == "array"
        else given
    )
    expected, _, _ = _expected(backend, arrays, 2.0, 2, total_norm=value)
    if inplace:
        got_total = fastclip.clip_by_global_norm_(arrays, 2.0, total_norm=total_arg)
        outs = arrays
    else:
        outs, got_total = fastclip.clip_by_global_norm(arrays, 2.0, total_norm=total_arg)
    assert_close(backend.to_numpy(got_total), np.float64(value), "float32")
    for o, e in zip(outs, expected):
        assert_close(backend.to_numpy(o), e, "float32")


# --------------------------------------------------------------- non-finite


def _nonfinite_arrays(backend, dtype, bad):
    arrays = _arrays(backend, [dtype] * 4, seed=70)
    data = sample((2, 3), seed=71)
    data[1, 2] = bad
    arrays.append(backend.asarray(data, dtype))
    return arrays


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=str)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("count", [1, 5, 9])
@pytest.mark.parametrize(
    ("backend", "dtype"), params(WRITEABLE, ["bfloat16", "float32", "float64"])
)
def test_error_if_nonfinite_raises_and_modifies_nothing(backend, dtype, count, inplace, bad):
    arrays = _nonfinite_arrays(backend, dtype, bad)
    arrays = [arrays[-1]] + [
        backend.asarray(sample(4, seed=80 + i), dtype) for i in range(count - 1)
    ]
    before = [backend.to_numpy(a) for a in arrays]
    func = fastclip.clip_by_global_norm_ if inplace else fastclip.clip_by_global_norm
    with pytest.raises(fastclip.NonFiniteNormError) as info:
        func(arrays, 1.0, error_if_nonfinite=True)
    assert isinstance(info.value, RuntimeError)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(backend.to_numpy(a), b)
    with pytest.raises(RuntimeError):  # also for a given non-finite total_norm
        func(arrays[1:] or arrays, 1.0, total_norm=math.inf, error_if_nonfinite=True)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(backend.to_numpy(a), b)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=str)
@pytest.mark.parametrize("ord", ORDS, ids=str)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    ("backend", "dtype"), params(WRITEABLE, ["bfloat16", "float32", "float64"])
)
def test_nonfinite_norm_propagates_by_default(backend, dtype, inplace, ord, bad):
    """NaN norm -> every output NaN; inf norm -> coefficient 0 (finite values become 0)."""
    arrays = _nonfinite_arrays(backend, dtype, bad)
    expected, total, _ = _expected(backend, arrays, 1.0, ord)
    if inplace:
        got_total = fastclip.clip_by_global_norm_(arrays, 1.0, ord)
        outs = arrays
    else:
        outs, got_total = fastclip.clip_by_global_norm(arrays, 1.0, ord)
    got_total = backend.to_numpy(got_total)
    assert_close(got_total, total, norm_dtype(dtype))
    assert np.isnan(got_total) if np.isnan(bad) else got_total == np.inf
    for o, e in zip(outs, expected):
        assert_close(backend.to_numpy(o), e, dtype)
    if np.isnan(bad):
        assert all(np.isnan(backend.to_numpy(o)).all() for o in outs if o.shape[0] != 0)


def test_error_if_nonfinite_with_finite_norm_clips_normally():
    arrays = [np.array(sample(5, seed=i), np.float32) for i in range(3)]
    expected, total = ref.clip_by_global_norm(arrays, 1.0)
    got = fastclip.clip_by_global_norm_(arrays, 1.0, error_if_nonfinite=True)
    assert_close(got, total, "float32")
    for a, e in zip(arrays, expected):
        assert_close(a, e, "float32")


# ------------------------------------------------------------------ accuracy


def test_global_clip_accuracy_large_float32():
    rng = np.random.default_rng(90)
    arrays = [rng.standard_normal(n, dtype=np.float32) for n in (3_000_000, 1, 2_000_001, 70_000)]
    expected, total = ref.clip_by_global_norm(arrays, 100.0)
    got = float(fastclip.clip_by_global_norm_(arrays, 100.0))
    assert abs(got - total) / total < 1e-7
    for a, e in zip(arrays, expected):
        assert_close(a, e, "float32")


def test_huge_values_give_a_finite_global_norm():
    arrays = [np.array(sample(300, seed=i, scale=1e20), np.float32) for i in range(3)]
    expected, total = ref.clip_by_global_norm(arrays, 1.0)
    got = fastclip.clip_by_global_norm_(arrays, 1.0)
    assert np.isfinite(got)
    assert_close(got, total, "float32")
    for a, e in zip(arrays, expected):
        assert_close(a, e, "float32", atol=1e-30)


@pytest.mark.parametrize("count", [2, FEW, FEW + 1, 20])
@pytest.mark.parametrize("func", ["clip_by_global_norm_", "clip_by_value_"])
def test_torch_lists_with_two_views_of_one_memory_are_refused_unchanged(count, func):
    """Both header paths of torch lists (Python lists up to FEW tensors, fromiter
    beyond) check that no two tensors share memory, before any write."""
    torch = pytest.importorskip("torch")
    base = torch.arange(1.0, 9.0)
    tensors = [torch.full((3,), 5.0 + i) for i in range(count - 2)] + [base[:5], base[3:]]
    before = [t.clone() for t in tensors]
    call = getattr(fastclip, func)
    with pytest.raises(ValueError, match=r"share memory|overlap"):
        call(tensors, 1.0) if func == "clip_by_global_norm_" else call(tensors, -1.0, 1.0)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)
