"""Data safety of the public API: nothing is written before every input is validated.

This file owns validate-before-write for many-array value clipping, lazily negated
views, scalars in lists, huge integers and the per-sample extremes; single-operation
refusals are in test_bad_input.py.

One regression test (or group) per item of the issue's "Data safety" list that
the API layer answers, across the CPU backend matrix where it applies:

1. list clamping (``fastclip.torch.clip_grad_value_``) validates the whole
   list before clamping any array;
2. clear TypeError/ValueError for complex gradients in value clipping, lazily
   negated/conjugated torch views, NumPy scalars in lists and Python ints
   beyond float64's range as arguments;
3. validation happens whatever the norm turns out to be (NaN included);
4. per-sample norms of 1e200- and 1e-200-valued samples are finite and right.

A refused call must leave every byte of every input as it was: each test
snapshots the memory owning its inputs before the call and compares after.
Values are checked against float64 NumPy references (``reference.py``) or
``torch.nn.utils``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
from _backends import Backend, backend_params, to_f64

import fastclip
import fastclip.torch as fct
from fastclip import _api

CPU = [Backend.NUMPY, Backend.NUMPY_READONLY, Backend.TORCH, Backend.ARRAY_API_STRICT]


# ----------------------------------------------------------------- helpers


def _owner_bytes(x):
    """Every byte of the memory ``x`` lives in (the whole storage, for views)."""
    if isinstance(x, torch.Tensor):
        return bytes(x.untyped_storage())
    if isinstance(x, np.ndarray):
        while isinstance(x.base, np.ndarray):
            x = x.base
        return x.tobytes()
    return np.from_dlpack(x).tobytes()  # array-api-strict


class Unchanged:
    """``with Unchanged(*arrays):`` asserts afterwards that no byte of them changed."""

    def __init__(self, *arrays):
        self.arrays = arrays

    def __enter__(self):
        self.before = [_owner_bytes(a) for a in self.arrays]

    def __exit__(self, *exc):
        assert [_owner_bytes(a) for a in self.arrays] == self.before, "an input was modified"
        return False


class _Holder:
    """A parameter stand-in: anything with a ``.grad`` (fastclip.torch reads only that)."""

    def __init__(self, grad):
        self.grad = grad


def _params(*grads):
    return [_Holder(g) for g in grads]


DATA = np.array([-5.0, -0.25, 0.5, 3.0])


# ------------------------------------------ 1. whole list validated first


@pytest.mark.parametrize("backend", backend_params(CPU))
def test_value_clipping_of_a_refused_list_writes_nothing(backend):
    """A complex array at the end of a list: TypeError, and the float and int arrays
    before it keep their bytes (they used to be clamped one by one first)."""
    floats = backend.asarray(DATA, "float32")
    ints = backend.asarray(np.array([-7, 2, 9]), "int32")
    bad = backend.asarray(np.array([1.0, 2.0]), "complex64")
    with Unchanged(floats, ints, bad), pytest.raises(TypeError, match="complex"):
        _api.clip_values_([floats, ints, bad], -1.0, 1.0)


@pytest.mark.parametrize("backend", backend_params(CPU))
def test_value_clipping_of_a_mixed_list(backend):
    """Float and integer arrays in one list: each clamped as np.clip does (bounds
    rounded inward for integers); read-only arrays refused before any write."""
    floats = backend.asarray(DATA, "float32")
    ints = backend.asarray(np.array([-7, 0, 9]), "int32")
    wide = backend.asarray(DATA * 3, "float64")
    items = [floats, ints, wide]
    if not backend.writeable:
        with Unchanged(*items), pytest.raises(ValueError, match="read-only"):
            _api.clip_values_(items, -1.5, 2.5)
        return
    _api.clip_values_(items, -1.5, 2.5)
    np.testing.assert_array_equal(to_f64(floats), np.clip(DATA.astype(np.float32), -1.5, 2.5))
    np.testing.assert_array_equal(to_f64(ints), np.clip([-7, 0, 9], -1, 2))
    np.testing.assert_array_equal(to_f64(wide), np.clip(DATA * 3, -1.5, 2.5))


def test_clip_grad_value_expanded_after_int32_writes_nothing():
    """The issue's case: an expanded gradient after an int32 one; the float gradient
    first in the list was already clamped.  Now: ValueError, every byte unchanged."""
    first = torch.tensor([5.0, -5.0, 0.5])
    ints = torch.tensor([7, -7, 0], dtype=torch.int32)
    base = torch.tensor([5.0])
    expanded = base.expand(3)
    with Unchanged(first, ints, base), pytest.raises(ValueError, match="share memory"):
        fct.clip_grad_value_(_params(first, ints, expanded), 1.0)


def test_clip_grad_value_tensor_on_another_device_later_writes_nothing():
    """A gradient on another device (``meta`` stands in for CUDA here) after a float32
    and an int32 one: TypeError before the CPU ones are clamped."""
    first = torch.tensor([5.0, -5.0])
    ints = torch.tensor([7, -7], dtype=torch.int32)
    other = torch.tensor([5.0], device="meta")
    with Unchanged(first, ints), pytest.raises(TypeError, match="one device"):
        fct.clip_grad_value_(_params(first, ints, other), 1.0)


def test_value_clipping_numpy_list_with_a_stride_0_array_writes_nothing():
    first = DATA.copy()
    ints = np.array([7, -7], np.int32)
    base = np.array([5.0])
    shared = np.lib.stride_tricks.as_strided(base, shape=(3,), strides=(0,))  # writeable
    assert shared.flags.writeable
    with Unchanged(first, ints, base), pytest.raises(ValueError, match="share memory"):
        _api.clip_values_([first, ints, shared], -1.0, 1.0)


def test_value_clipping_mixed_list_sharing_memory_writes_nothing():
    """An int32 view of a float32 array in the same in-place list: the memory would be
    clamped twice under two interpretations.  Refused, bytes unchanged."""
    floats = np.array([5.0, -5.0, 0.5], np.float32)
    with Unchanged(floats), pytest.raises(ValueError, match="share memory"):
        _api.clip_values_([floats, floats.view(np.int32)], -1.0, 1.0)


def test_value_clipping_gpu_route_checks_every_array_first(monkeypatch):
    """The GPU branch of the whole-list check, with the host emulation of the GPU
    adapter: an expanded (stride 0) integer array after a float one is refused before
    any clamp is launched, and a float dtype the kernels lack is a TypeError."""
    import _gpu_emulation

    from fastclip._gpu import _value_clip as gpu_value_clip

    class Lib(_gpu_emulation.HostLib):
        kind = staticmethod(lambda x: "float32" if x.dtype == np.float32 else None)

    floats = np.array([5.0, -5.0], np.float32)
    base = np.array([7], np.int32)
    shared = np.lib.stride_tricks.as_strided(base, shape=(3,), strides=(0,))
    with Unchanged(floats, base), pytest.raises(ValueError, match="share memory"):
        gpu_value_clip.check_value_targets(Lib, [floats, shared])
    with pytest.raises(TypeError, match="does not support float16"):
        gpu_value_clip.check_value_targets(Lib, [floats, floats.astype("f2")])
    gpu_value_clip.check_value_targets(Lib, [floats, base])  # valid: no error


def test_clip_grad_value_mixed_list_matches_torch():
    grads = [torch.tensor([5.0, -5.0, 0.5]), torch.tensor([[3.0], [-0.1]], dtype=torch.float64)]
    ours = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_value_(params, 1.0)
    fct.clip_grad_value_(_params(*ours), 1.0)
    for o, p in zip(ours, params):
        torch.testing.assert_close(o, p.grad, rtol=0, atol=0)


# ------------------------------------------------------ 2. clear refusals


def test_clip_grad_value_complex_is_a_type_error_as_torch_refuses_it():
    """torch refuses to clamp complex gradients (NotImplementedError); fastclip says why
    with a TypeError instead of leaking numba's TypingError, and writes nothing."""
    real = torch.tensor([5.0, -5.0])
    z = torch.tensor([5 + 5j, -1 + 0j], dtype=torch.complex64)
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    p.grad = z.clone()
    with pytest.raises(NotImplementedError):
        torch.nn.utils.clip_grad_value_([p], 1.0)
    with Unchanged(real, z), pytest.raises(TypeError, match=r"complex arrays .*no order"):
        fct.clip_grad_value_(_params(real, z), 1.0)


def _neg_f16():
    owner = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float16)
    return owner, owner._neg_view()


def _conj_imag_c32():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "ComplexHalf support is experimental"
        owner = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex32)
    return owner, owner.conj().imag


def _neg_f32():
    owner = torch.tensor([1.0, -2.0, 3.0])
    return owner, owner._neg_view()


LAZY_VIEWS = {"neg-float16": _neg_f16, "conj-imag-complex32": _conj_imag_c32, "neg-f32": _neg_f32}

CALLS = {
    "norm": lambda v, o: fastclip.norm(v),
    "global_norm": lambda v, o: fastclip.global_norm([o.real.float() * 0 + 1, v]),
    "clip_by_norm": lambda v, o: fastclip.clip_by_norm(v, 1.0),
    "clip_by_norm_": lambda v, o: fastclip.clip_by_norm_(v, 1.0),
    "clip_by_value_": lambda v, o: fastclip.clip_by_value_(v, -1.0, 1.0),
    "clip_by_global_norm_": lambda v, o: fastclip.clip_by_global_norm_([v, v.clone()], 1.0),
    "scale_": lambda v, o: fastclip.scale_([v], 0.5),
    "clip_grad_norm_": lambda v, o: fct.clip_grad_norm_(_params(v), 1.0),
    "clip_grad_value_": lambda v, o: fct.clip_grad_value_(_params(v), 1.0),
    "get_total_norm": lambda v, o: fct.get_total_norm([v]),
    "clip_per_sample": lambda v, o: fastclip.clip_per_sample(v.reshape(1, -1), 1.0),
}


@pytest.mark.parametrize("view", LAZY_VIEWS)
@pytest.mark.parametrize("call", CALLS)
def test_lazily_negated_views_are_a_clear_type_error(view, call):
    """16-bit negated views used to leak torch's RuntimeError from ``.view(int16)``;
    every function now names the view and ``.resolve_neg()``, before any write."""
    owner, v = LAZY_VIEWS[view]()
    assert v.is_neg()
    with Unchanged(owner), pytest.raises(TypeError, match=r"lazily negated.*resolve_neg"):
        CALLS[call](v, owner)


def test_lazily_negated_view_later_in_a_list_writes_nothing():
    plain = torch.tensor([30.0, 40.0], dtype=torch.float16)
    owner, v = _neg_f16()
    with Unchanged(plain, owner), pytest.raises(TypeError, match="tensor 1 of the list"):
        fastclip.clip_by_global_norm_([plain, v], 1.0)


def test_resolved_view_gives_the_reference_norm():
    """The route the message names: ``.resolve_neg()`` (a copy) is clipped as torch does."""
    _, v = _neg_f16()
    got = fastclip.norm(v.resolve_neg())
    np.testing.assert_allclose(float(got), np.linalg.norm([1.0, 2.0, 3.0]), rtol=1e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, a: fastclip.global_norm([s, a]),
        lambda s, a: fastclip.clip_by_global_norm([s, a], 1.0),
        lambda s, a: fastclip.clip_by_global_norm_([a, s], 1.0),
        lambda s, a: fastclip.scale_([a, s], 2.0),
        lambda s, a: _api.clip_values_([a, s], -1.0, 1.0),
    ],
    ids=["global_norm", "clip_by_global_norm", "clip_by_global_norm_", "scale_", "clip_values_"],
)
def test_numpy_scalars_in_lists_are_a_clear_type_error(call):
    """``[np.float32(3.0), np.ones(2)]`` used to raise AttributeError ('ctypes')."""
    arr = np.full(2, 4.0)
    with Unchanged(arr), pytest.raises(TypeError, match=r"NumPy scalar .*np\.asarray"):
        call(np.float32(3.0), arr)
    # the route the message names: a 0-d array gives the float64 reference
    np.testing.assert_allclose(
        fastclip.global_norm([np.asarray(np.float32(3.0)), arr]),
        ref.global_norm([np.asarray(3.0), arr]),
        rtol=1e-12,
    )


HUGE = 10**400

HUGE_CORE = {
    "max_norm": lambda x: fastclip.clip_by_norm_(x, HUGE),
    "ord": lambda x: fastclip.norm(x, HUGE),
    "eps": lambda x: fastclip.clip_by_norm_(x, 1.0, eps=HUGE),
    "min": lambda x: fastclip.clip_by_value_(x, -HUGE, 1.0),
    "max": lambda x: fastclip.clip_by_value_(x, None, HUGE),
    "factor": lambda x: fastclip.scale_([x], HUGE),
    "total_norm": lambda x: fastclip.clip_by_global_norm_([x], 1.0, total_norm=HUGE),
    "max_norm[0]": lambda x: fastclip.clip_per_sample([x], [HUGE], per_layer=True),
    "max_norm ": lambda x: fastclip.clip_by_global_norm([x], HUGE),
}


@pytest.mark.parametrize("backend", backend_params(CPU))
@pytest.mark.parametrize("name", HUGE_CORE)
def test_ints_beyond_float64_are_a_value_error_naming_the_argument(backend, name):
    """10**400 used to raise OverflowError from float(); NumPy and torch refuse it too, so
    fastclip refuses it with a ValueError naming the argument (and what to pass)."""
    x = backend.asarray(DATA.reshape(2, 2), "float32")
    argument = name.strip().replace("[", r"\[").replace("]", r"\]")
    with (
        Unchanged(x),
        pytest.raises(ValueError, match=rf"^fastclip(\.\w+)+: {argument} is too large"),
    ):
        HUGE_CORE[name](x)


HUGE_TORCH = {
    "max_norm": lambda ps: fct.clip_grad_norm_(ps, HUGE),
    "norm_type": lambda ps: fct.clip_grad_norm_(ps, 1.0, HUGE),
    "clip_value": lambda ps: fct.clip_grad_value_(ps, HUGE),
    "max_norm ": lambda ps: fct.clip_grads_with_norm_(ps, HUGE, torch.tensor(1.0)),
    "total_norm": lambda ps: fct.clip_grads_with_norm_(ps, 1.0, HUGE),
    "norm_type ": lambda ps: fct.get_total_norm([p.grad for p in ps], HUGE),
}


@pytest.mark.parametrize("name", HUGE_TORCH)
def test_torch_ints_beyond_float64_are_a_value_error(name):
    grad = torch.tensor([3.0, 4.0])
    with (
        Unchanged(grad),
        pytest.raises(ValueError, match=rf"^fastclip\.torch\.\w+: {name.strip()} is too large"),
    ):
        HUGE_TORCH[name](_params(grad))


def test_clip_coefficient_int_beyond_float64():
    with pytest.raises(ValueError, match=r"^fastclip\.clip_coefficient: total_norm is too large"):
        fastclip.clip_coefficient(HUGE, 1.0)
    with pytest.raises(ValueError, match=r"^fastclip\.clip_coefficient: max_norm is too large"):
        fastclip.clip_coefficient(2.0, HUGE)
    assert fastclip.clip_coefficient(2**1000, 1.0) == 1.0 / (2.0**1000 + 1e-6)  # in range


# ------------------------------------ 3. validation whatever the norm is


@pytest.mark.parametrize("backend", backend_params(CPU))
def test_nan_norm_does_not_skip_validation(backend):
    """A NaN total norm (given or computed) must not let a bad array through: arrays are
    validated before the norm is looked at."""
    good = backend.asarray(DATA, "float32")
    nan = backend.asarray(np.array([np.nan, 1.0]), "float32")
    bad = backend.asarray(np.array([1.0, 2.0]), "int32")  # not a floating-point array
    for kwargs in ({}, {"total_norm": math.nan}, {"error_if_nonfinite": True}):
        with Unchanged(good, nan, bad), pytest.raises((TypeError, ValueError)):
            fastclip.clip_by_global_norm_([good, nan, bad], 1.0, **kwargs)


def test_clip_per_sample_nan_samples_still_validated():
    """Mismatched batch sizes are refused even when every norm is NaN."""
    g = np.full((3, 2), np.nan)
    h = np.ones((4, 2))
    with Unchanged(g, h), pytest.raises(ValueError, match="same batch size"):
        fastclip.clip_per_sample([g, h], 1.0)


@pytest.mark.parametrize("max_norm", [-1.0, math.nan])
def test_torch_norm_type_le_0_validates_max_norm_before_scaling(max_norm):
    """``norm_type <= 0`` (torch's formula for the "norm") used to skip the max_norm
    check and scale by a negative or NaN coefficient; torch.nn.utils documents no such
    values, fastclip refuses them on every path, before any write."""
    grad = torch.tensor([3.0, 0.0, 4.0])
    with Unchanged(grad), pytest.raises(ValueError, match="max_norm must be >= 0"):
        fct.clip_grad_norm_(_params(grad), max_norm, norm_type=0.0)
    with Unchanged(grad), pytest.raises(ValueError, match="max_norm must be >= 0"):
        fct.clip_grads_with_norm_(_params(grad), max_norm, torch.tensor(math.nan))


def test_torch_norm_type_le_0_matches_torch():
    grads = [torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 2.0])]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    ours = [g.clone() for g in grads]
    want = torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type=0.0)
    got = fct.clip_grad_norm_(_params(*ours), 1.0, norm_type=0.0)
    torch.testing.assert_close(got, want)
    for o, p in zip(ours, params):
        torch.testing.assert_close(o, p.grad)


# ------------------------------- 4. per-sample norms of extreme magnitudes


@pytest.mark.parametrize("backend", backend_params(CPU))
@pytest.mark.parametrize("scale", [1e200, 1e-200])
@pytest.mark.parametrize("ord", [2, 3])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("reduce", ["sum", None])
def test_per_sample_extreme_magnitudes(backend, scale, ord, per_layer, reduce):
    """float64 samples of 1e200 (squares overflow: the norm was inf and the factor 0, so
    the sample was dropped) and 1e-200 (squares underflow: norm 0).  The float64 oracle
    runs on the unscaled data: with eps=0, out(s * g, s * C) = s * out(g, C)."""
    rng = np.random.default_rng(3)
    base = [rng.standard_normal((6, 4)), rng.standard_normal((6, 2, 3))]
    base[0][1] = 0.0  # a zero slice: factor 1 per layer
    bounds = [3.0, 1.0] if per_layer else 2.0
    xs = [backend.asarray(b * scale, "float64") for b in base]
    c = [b * scale for b in bounds] if per_layer else bounds * scale
    with Unchanged(*xs):
        got = fastclip.clip_per_sample(xs, c, ord, per_layer=per_layer, reduce=reduce, eps=0.0)
    outs, norms, clipped = ref.clip_per_sample(base, bounds, ord, per_layer, reduce, 0.0)
    got_norms = to_f64(got.norms)
    assert np.isfinite(got_norms).all()
    np.testing.assert_allclose(got_norms, norms * scale, rtol=1e-12)
    assert got.n_clipped == clipped
    for o, e in zip(got.grads, outs, strict=True):
        np.testing.assert_allclose(to_f64(o), e * scale, rtol=1e-12, atol=1e-12 * scale)


def test_per_sample_float32_large_values_unchanged_path():
    """float32 squares cannot leave float64's range: no rescaling pass, same norms."""
    x = (np.random.default_rng(4).standard_normal((5, 7)) * 1e30).astype(np.float32)
    got = fastclip.clip_per_sample(x, 1.0, eps=0.0)
    np.testing.assert_allclose(got.norms, np.linalg.norm(x.astype(np.float64), axis=1), rtol=1e-6)


@pytest.mark.parametrize("backend", backend_params(CPU))
@pytest.mark.parametrize("per_layer", [False, True])
def test_per_sample_subnormal_samples(backend, per_layer):
    """A sample of float64 subnormals (squares 0, 1 / max beyond float64): the norm is
    the float64 reference's (np.hypot, exact there), through the core's robust_norm."""
    x = np.array([[3e-310, 4e-310], [3e-200, 4e-200], [3.0, 4.0]])
    got = fastclip.clip_per_sample(
        [backend.asarray(x, "float64")], [1.0] if per_layer else 1.0, per_layer=per_layer
    )
    expected = np.hypot(x[:, 0], x[:, 1])
    np.testing.assert_allclose(to_f64(got.norms).reshape(-1), expected, rtol=1e-12)
    # factors: 1 for the two tiny samples, 1 / (5 + 1e-6) for the last (Opacus' eps)
    want = x[0] + x[1] + x[2] / (5.0 + 1e-6)
    np.testing.assert_allclose(to_f64(got.grads[0]), want, rtol=1e-12)
    assert got.n_clipped == 1
