"""Data safety of the core routes: one regression test per item, across the backends.

This file owns out-of-place non-writes, subnormal and tiny norms, rounding of extreme
coefficients and refused dtypes, on the CPU backends; their Dask twins are in
tests/routes/test_dask.py, integer clipping in test_clip_value.py.

1. Out-of-place calls never write their input, also where the per-slice plan's
   transposed view is already contiguous (size-1 axes, channels_last tensors)
   and for read-only inputs.
2. Norms of float64 data whose largest |x| is subnormal are finite and right
   (max-rescaling by a power of two, not by 1 / max|x|), so clipping keeps data.
3. The clip coefficient stays float64 and only the product is rounded, so
   extreme factors on 32-bit data give representable results, not 0 or inf.
4. Integer and bool ``clip_by_value`` saturates infinite and huge bounds; byte-
   swapped and long double arrays are refused with a TypeError before any write.

Every value is checked against a float64 NumPy oracle, and every refused call
leaves the bytes of every input unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from _backends import UNSUPPORTED_DTYPES, Backend, assert_close, backend_params, unchanged
from hypothesis import given, settings
from hypothesis import strategies as st

import fastclip

WRITEABLE_CPU = backend_params([Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT])


# --------------------------------------------- 1. out of place never writes


@pytest.mark.parametrize("func", ["clip_by_norm", "normalize"])
def test_out_of_place_per_slice_leaves_input_alone(cpu_backend, func):
    data = np.full((2, 1, 3), 5.0)
    x = cpu_backend.asarray(data)
    before = cpu_backend.to_numpy(x)
    if func == "clip_by_norm":
        out = fastclip.clip_by_norm(x, 1.0, axis=1)
        expected = ref.clip_by_norm(data, 1.0, axis=1)
    else:
        out = fastclip.normalize(x, axis=1)
        expected = ref.normalize(data, axis=1)
    cpu_backend.assert_array(out, x, "float64", data.shape)
    assert_close(cpu_backend.to_numpy(out), expected, "float64")
    np.testing.assert_array_equal(cpu_backend.to_numpy(x), before)


@pytest.mark.parametrize("readonly", [False, True])
def test_normalize_of_contiguous_transpose_leaves_base_alone(readonly):
    base = np.arange(1.0, 25.0).reshape(2, 4, 3)
    base.flags.writeable = not readonly
    before = base.copy()
    view = base.transpose(0, 2, 1)  # (2, 3, 4); reduced axis 1 makes a contiguous plan
    out = fastclip.normalize(view, axis=1)
    np.testing.assert_allclose(out, ref.normalize(before.transpose(0, 2, 1), axis=1), rtol=1e-12)
    np.testing.assert_array_equal(base, before)
    out2 = fastclip.clip_by_norm(view, 1.0, axis=(0, 1))
    expected = ref.clip_by_norm(before.transpose(0, 2, 1), 1.0, axis=(0, 1))
    np.testing.assert_allclose(out2, expected, rtol=1e-12)
    np.testing.assert_array_equal(base, before)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("axis", [1, (1, 2), (2, 3), 0])
def test_channels_last_tensor_is_not_written(dtype, axis):
    torch = pytest.importorskip("torch")
    data = np.random.default_rng(3).standard_normal((2, 3, 4, 5)) * 5
    t = torch.tensor(data, dtype=getattr(torch, dtype)).to(memory_format=torch.channels_last)
    before = t.clone()
    data = t.to(torch.float64).numpy().copy()  # float64: .to() returns t itself
    out = fastclip.clip_by_norm(t, 1.0, axis=axis)
    assert torch.equal(t, before)
    assert_close(out.to(torch.float64).numpy(), ref.clip_by_norm(data, 1.0, axis=axis), dtype)
    out = fastclip.normalize(t, axis=axis)
    assert torch.equal(t, before)
    assert_close(out.to(torch.float64).numpy(), ref.normalize(data, axis=axis), dtype)
    # in place still writes the tensor itself, with the same values
    fastclip.clip_by_norm_(t, 1.0, axis=axis)
    assert_close(t.to(torch.float64).numpy(), ref.clip_by_norm(data, 1.0, axis=axis), dtype)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 3), min_size=2, max_size=4),
    data=st.data(),
)
def test_out_of_place_never_writes_any_layout(shape, data):
    """Random shapes (with size-1 axes), transposed views and reduction axes."""
    nd = len(shape)
    perm = data.draw(st.permutations(range(nd)))
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, nd - 1), min_size=1, max_size=nd))))
    base = np.random.default_rng(len(shape)).standard_normal(shape) * 3
    base.flags.writeable = data.draw(st.booleans())
    before = base.copy()
    x = base.transpose(perm)
    for out, expected in (
        (fastclip.clip_by_norm(x, 0.5, axis=axes), ref.clip_by_norm(x, 0.5, axis=axes)),
        (fastclip.normalize(x, axis=axes), ref.normalize(x, axis=axes)),
    ):
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-300)
        np.testing.assert_array_equal(base, before)


# ------------------------------------------------ 2. subnormal float64 norms

SUBNORMAL_CASES = [
    np.array([1e-310, 2e-310]),
    np.array([5e-324]),
    np.array([5e-324, -5e-324, 1e-323]),
    np.array([2.2e-308, 1e-310, 0.0]),
]


@pytest.mark.parametrize("case", range(len(SUBNORMAL_CASES)))
@pytest.mark.parametrize("ord", [2, 3, 1, math.inf])
def test_subnormal_norms_are_finite(cpu_backend, case, ord):
    data = SUBNORMAL_CASES[case]
    x = cpu_backend.asarray(data)
    expected = ref.norm(data, ord)
    got = cpu_backend.to_numpy(fastclip.norm(x, ord))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-323)
    got = cpu_backend.to_numpy(fastclip.global_norm([x, x], ord))
    np.testing.assert_allclose(got, ref.global_norm([data, data], ord), rtol=1e-12, atol=1e-323)
    # the norm is below max_norm: clipping must keep the data, not zero it
    out = fastclip.clip_by_norm(x, 1.0, ord)
    np.testing.assert_array_equal(cpu_backend.to_numpy(out), ref.clip_by_norm(data, 1.0, ord))
    outs, total = fastclip.clip_by_global_norm([x], 1.0, ord)
    np.testing.assert_array_equal(cpu_backend.to_numpy(outs[0]), data)
    np.testing.assert_allclose(cpu_backend.to_numpy(total), expected, rtol=1e-12, atol=1e-323)


def test_subnormal_norms_along_axes(cpu_backend):
    data = np.array([[1e-310, 2e-310, 0.0], [3.0, 4.0, 0.0], [5e-324, 0.0, 1e-320]])
    x = cpu_backend.asarray(data)
    for axis in (0, 1):
        got = cpu_backend.to_numpy(fastclip.norm(x, axis=axis))
        np.testing.assert_allclose(got, ref.norm(data, axis=axis), rtol=1e-12, atol=1e-323)
        out = cpu_backend.to_numpy(fastclip.clip_by_norm(x, 1.0, axis=axis))
        expected = ref.clip_by_norm(data, 1.0, axis=axis)
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-323)
        # slices whose norm is below max_norm come back unchanged, bit for bit
        small = ref.norm(data, axis=axis, keepdims=True) + 1e-6 <= 1.0
        np.testing.assert_array_equal(np.where(small, out, 0.0), np.where(small, data, 0.0))


@pytest.mark.parametrize("backend", WRITEABLE_CPU)
def test_subnormal_clip_in_place(backend):
    data = np.array([1e-310, 2e-310])
    x = backend.asarray(data)
    fastclip.clip_by_norm_(x, 1.0)
    np.testing.assert_array_equal(backend.to_numpy(x), data)
    y = backend.asarray(data)
    fastclip.clip_by_global_norm_([y, backend.asarray(data)], 1.0)
    np.testing.assert_array_equal(backend.to_numpy(y), data)


@settings(max_examples=60, deadline=None)
@given(
    mantissas=st.lists(st.floats(-2.0, 2.0), min_size=1, max_size=40),
    k=st.integers(1000, 1080),
    ord=st.sampled_from([2, 3, 1.5]),
)
def test_tiny_float64_norms_match_the_oracle(mantissas, k, ord):
    data = np.array(mantissas) * 2.0**-k  # down into the subnormals (and to 0)
    got = fastclip.norm(data, ord)
    expected = ref.norm(data, ord)
    assert np.isfinite(got)
    # subnormal results are rounded to a multiple of 2**-1074 by both sides
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=2e-323)
    got_axis = fastclip.norm(np.stack([data, data[::-1]]), ord, axis=1)
    np.testing.assert_allclose(got_axis, [expected, expected], rtol=1e-12, atol=2e-323)


# ------------------------------------------- 3. float64 clip coefficients


def _f32_backend_dtypes(backend):
    return ["float32", "bfloat16"] if backend.is_torch else ["float32"]


def test_tiny_clip_coefficient_is_not_rounded_to_zero(cpu_backend):
    for dtype in _f32_backend_dtypes(cpu_backend):
        data = np.array([1e30])
        x = cpu_backend.asarray(data, dtype)
        data = cpu_backend.to_numpy(x)
        expected = cpu_backend.round_to(ref.clip_by_norm(data, 1e-30, eps=0.0), dtype)
        out = cpu_backend.to_numpy(fastclip.clip_by_norm(x, 1e-30, eps=0.0))
        assert_close(out, expected, dtype)
        assert out[0] != 0.0
        outs, _ = fastclip.clip_by_global_norm([x], 1e-30, eps=0.0)
        assert_close(cpu_backend.to_numpy(outs[0]), expected, dtype)
        data2 = np.array([[1e30, 0.0], [2e30, 0.0]])
        x2 = cpu_backend.asarray(data2, dtype)
        data2 = cpu_backend.to_numpy(x2)
        for axis in (0, 1):
            out = cpu_backend.to_numpy(fastclip.clip_by_norm(x2, 1e-30, axis=axis, eps=0.0))
            expected = ref.clip_by_norm(data2, 1e-30, axis=axis, eps=0.0)
            assert_close(out, cpu_backend.round_to(expected, dtype), dtype)


def test_normalize_tiny_float32_with_eps_zero(cpu_backend):
    data = np.array([3e-42, 4e-42])  # float32 subnormals: 1 / norm overflows float32
    x = cpu_backend.asarray(data, "float32")
    data = cpu_backend.to_numpy(x)
    out = cpu_backend.to_numpy(fastclip.normalize(x, eps=0.0))
    assert_close(out, ref.normalize(data, eps=0.0), "float32")
    out = cpu_backend.to_numpy(
        fastclip.normalize(cpu_backend.asarray(data[None], "float32"), axis=1, eps=0.0)
    )
    assert_close(out, ref.normalize(data[None], axis=1, eps=0.0), "float32")


@pytest.mark.parametrize("backend", WRITEABLE_CPU)
def test_tiny_coefficient_in_place(backend):
    x = backend.asarray(np.array([1e30, -2e30]), "float32")
    data = backend.to_numpy(x)
    fastclip.clip_by_norm_(x, 1e-30, eps=0.0)
    expected = backend.round_to(ref.clip_by_norm(data, 1e-30, eps=0.0), "float32")
    assert_close(backend.to_numpy(x), expected, "float32")
    y = backend.asarray(np.array([3e-42, 4e-42]), "float32")
    data = backend.to_numpy(y)
    fastclip.normalize_(y, eps=0.0)
    assert_close(backend.to_numpy(y), ref.normalize(data, eps=0.0), "float32")


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(0.5, 2.0), min_size=1, max_size=30),
    e=st.integers(-140, 120),
    max_e=st.integers(-140, 120),
)
def test_float32_scaling_rounds_the_product_once(values, e, max_e):
    data = (np.array(values) * 2.0**e).astype(np.float32)
    max_norm = 2.0**max_e
    got = fastclip.clip_by_norm(data, max_norm, eps=0.0)
    expected = ref.clip_by_norm(data, max_norm, eps=0.0).astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1.5e-45)
    got = fastclip.normalize(data, eps=0.0)
    expected = ref.normalize(data, eps=0.0).astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1.5e-45)


# ------------------------------- 4. integer bounds, byte order, long double


def _calls(bad, good):
    """Every public function, in place and out of place, single and in lists."""
    return {
        "norm": lambda: fastclip.norm(bad),
        "norm_axis": lambda: fastclip.norm(bad.reshape(2, 2), axis=1),
        "clip_by_norm": lambda: fastclip.clip_by_norm(bad, 1.0),
        "clip_by_norm_": lambda: fastclip.clip_by_norm_(bad, 1.0),
        "clip_by_norm_axis_": lambda: fastclip.clip_by_norm_(bad.reshape(2, 2), 1.0, axis=0),
        "normalize": lambda: fastclip.normalize(bad),
        "normalize_": lambda: fastclip.normalize_(bad),
        "clip_by_value": lambda: fastclip.clip_by_value(bad, -1.0, 1.0),
        "clip_by_value_": lambda: fastclip.clip_by_value_(bad, -1.0, 1.0),
        "global_norm": lambda: fastclip.global_norm([good, bad]),
        "clip_by_global_norm": lambda: fastclip.clip_by_global_norm([good, bad], 1.0),
        "clip_by_global_norm_": lambda: fastclip.clip_by_global_norm_([good, bad], 1.0),
        "clip_by_global_norm_many_": lambda: fastclip.clip_by_global_norm_(
            [good] * 0 + [good, np.ones(3), bad], 0.1
        ),
    }


@pytest.mark.parametrize("dtype", UNSUPPORTED_DTYPES, ids=str)
def test_byte_swapped_and_long_double_are_refused_before_any_write(dtype):
    dt = np.dtype(dtype)
    good = np.full(4, 3.0)
    for name, call in _calls(np.arange(1, 5).astype(dt), good).items():
        bad = np.arange(1, 5).astype(dt)
        call = _calls(bad, good)[name]
        with unchanged(good, bad):
            if dt.kind in "iu" and "value" not in name:
                with pytest.raises(TypeError):  # not floating point at all
                    call()
            elif dt.kind == "c" and "value" in name:
                with pytest.raises(TypeError, match="complex"):
                    call()
            else:
                match = "byte order" if not dt.isnative else "no kernels for"
                with pytest.raises(TypeError, match=match) as info:
                    call()
                if not dt.isnative:
                    assert "newbyteorder" in str(info.value)


def test_native_byte_order_spelled_explicitly_still_works():
    data = np.array([3.0, 4.0])
    for dt in ("=f8", "<f8" if np.little_endian else ">f8"):
        x = data.astype(dt)
        np.testing.assert_allclose(fastclip.norm(x), ref.norm(data), rtol=1e-12)
        np.testing.assert_allclose(fastclip.clip_by_norm(x, 1.0), ref.clip_by_norm(data, 1.0))
    fixed = data.astype(">f8").astype(np.dtype(">f8").newbyteorder("="))
    np.testing.assert_allclose(fastclip.norm(fixed), 5.0, rtol=1e-12)


@pytest.mark.parametrize("reduce", ["sum", "mean", None])
def test_per_sample_tiny_factors_are_not_flushed(reduce):
    """float32 samples of norm ~1e30 clipped to 1e-30: the factor (~1e-60) is below
    float32's range but the clipped values are representable and must not come
    out 0 (the factor used to be rounded to float32 first).  float16 cannot show
    it: its products underflow long before a float32 factor does."""
    dtype, big, c = "float32", 1e30, 1e-30
    grads = [(np.linspace(0.5, 1.5, 2 * 3).reshape(2, 3) * big).astype(dtype)]
    got = fastclip.clip_per_sample(grads, c, reduce=reduce)
    g64 = grads[0].astype(np.float64)
    norms = np.sqrt((g64**2).sum(axis=1))
    f = np.minimum(1.0, c / (norms + 1e-6))
    want = g64 * f[:, None]
    if reduce == "sum":
        want = want.sum(axis=0)
    elif reduce == "mean":
        want = want.mean(axis=0)
    out = got.grads[0].astype(np.float64)
    tiny = float(np.finfo(dtype).smallest_subnormal)
    with np.errstate(under="ignore"):
        expected = want.astype(dtype).astype(np.float64)
    np.testing.assert_allclose(
        out, expected, rtol=2e-2 if dtype == "float16" else 1e-6, atol=2 * tiny
    )
    assert np.all(out != 0) or np.all(expected == 0)


@pytest.mark.parametrize("ord", [1, 2, 3, math.inf])
def test_complex64_magnitudes_beyond_float32_are_not_inf(ord):
    """|3e38 + 3e38j| = 4.2e38 is beyond float32: the magnitude is taken in float64
    (it overflowed to inf in complex64, and normalize then returned 0)."""
    x = np.array([3e38 + 3e38j, 1e38j], np.complex64)
    want = ref.normalize(x, ord)
    np.testing.assert_allclose(fastclip.normalize(x, ord), want.astype(np.complex64), rtol=1e-6)
    got, _ = fastclip.clip_by_global_norm([x], 1e-30, ord, eps=0.0)
    want_c, _ = ref.clip_by_global_norm([x], 1e-30, ord, eps=0.0)
    np.testing.assert_allclose(got[0], want_c[0].astype(np.complex64), rtol=1e-6, atol=1e-44)
