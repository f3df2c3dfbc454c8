"""Every item of the issue's "Bad input" list: the right exception, and nothing modified.

This file owns the argument and array checks shared by the public functions (types,
bounds, orders, axes, read-only, stride 0, overlap, mixed libraries and devices); route-
specific fast paths are in tests/routes/.

Each test snapshots every input array before the call and checks, after the
exception, that all of them still hold exactly their old values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
from _backends import Backend, assert_close, sample, to_f64, unchanged
from numpy.exceptions import AxisError

import fastclip
import fastclip.torch as fct

NORM_FUNCS = [
    ("norm", lambda x, **kw: fastclip.norm(x, **kw)),
    ("clip_by_norm", lambda x, **kw: fastclip.clip_by_norm(x, 1.0, **kw)),
    ("clip_by_norm_", lambda x, **kw: fastclip.clip_by_norm_(x, 1.0, **kw)),
    ("normalize", lambda x, **kw: fastclip.normalize(x, **kw)),
    ("normalize_", lambda x, **kw: fastclip.normalize_(x, **kw)),
]
GLOBAL_FUNCS = [
    ("global_norm", lambda xs, **kw: fastclip.global_norm(xs, **kw)),
    ("clip_by_global_norm", lambda xs, **kw: fastclip.clip_by_global_norm(xs, 1.0, **kw)),
    ("clip_by_global_norm_", lambda xs, **kw: fastclip.clip_by_global_norm_(xs, 1.0, **kw)),
]
IN_PLACE_GLOBAL = [
    ("clip_by_global_norm_", lambda xs: fastclip.clip_by_global_norm_(xs, 0.1)),
    ("scale_", lambda xs: fastclip.scale_(xs, 0.5)),
]
ids = lambda cases: [c[0] for c in cases]  # noqa: E731


# ------------------------------------------------------- not arrays at all


@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, "abc", None, {"a": 1}], ids=repr)
def test_not_an_array_raises_type_error(bad):
    for func in (
        fastclip.norm,
        lambda x: fastclip.clip_by_norm(x, 1.0),
        lambda x: fastclip.clip_by_norm_(x, 1.0),
        fastclip.normalize,
        fastclip.normalize_,
        lambda x: fastclip.clip_by_value(x, -1, 1),
        lambda x: fastclip.clip_by_value_(x, -1, 1),
    ):
        with pytest.raises(TypeError):
            func(bad)


@pytest.mark.parametrize(
    ("name", "func"),
    GLOBAL_FUNCS + IN_PLACE_GLOBAL[1:],
    ids=ids(GLOBAL_FUNCS + IN_PLACE_GLOBAL[1:]),
)
def test_list_of_non_arrays_raises_type_error(name, func):
    good = [np.ones(4, np.float32), np.ones(3, np.float32)]
    for bad in ([1.0, 2.0], [*good, "abc"], [*good, [1.0, 2.0]], 5, [*good, None]):
        with unchanged(*good), pytest.raises(TypeError):
            func(bad)


# ------------------------------------------------------------ scalar args


@pytest.mark.parametrize("max_norm", [-1.0, -1e-30, math.nan, -math.inf], ids=repr)
def test_negative_or_nan_max_norm_raises_value_error(max_norm):
    x = np.array(sample(5, seed=1), np.float32)
    xs = [x, np.ones(3)]
    with unchanged(*xs):
        for call in (
            lambda: fastclip.clip_by_norm(x, max_norm),
            lambda: fastclip.clip_by_norm_(x, max_norm),
            lambda: fastclip.clip_by_global_norm(xs, max_norm),
            lambda: fastclip.clip_by_global_norm_(xs, max_norm),
            lambda: fastclip.clip_coefficient(1.0, max_norm),
        ):
            with pytest.raises(ValueError):
                call()


@pytest.mark.parametrize(
    "max_norm", ["1.0", True, False, None, [1.0], 1 + 2j, np.ones(2)], ids=repr
)
def test_non_numeric_or_bool_max_norm_raises_type_error(max_norm):
    x = np.array(sample(5, seed=2), np.float32)
    xs = [x, np.ones(3)]
    # an array max_norm is a per-slice bound for clip_by_norm (test_peer_parity.py):
    # np.ones(2) does not broadcast to x's one norm, a ValueError there
    per_slice = ValueError if isinstance(max_norm, np.ndarray) else TypeError
    with unchanged(*xs):
        for call, exc in (
            (lambda: fastclip.clip_by_norm(x, max_norm), per_slice),
            (lambda: fastclip.clip_by_norm_(x, max_norm), per_slice),
            (lambda: fastclip.clip_by_global_norm_(xs, max_norm), TypeError),
        ):
            with pytest.raises(exc):
                call()


@pytest.mark.parametrize("eps", [-1e-6, math.nan, math.inf], ids=repr)
def test_bad_eps_raises_value_error(eps):
    x = np.array(sample(5, seed=3), np.float32)
    with unchanged(x):
        for call in (
            lambda: fastclip.clip_by_norm_(x, 1.0, eps=eps),
            lambda: fastclip.normalize_(x, eps=eps),
            lambda: fastclip.clip_by_global_norm_([x], 1.0, eps=eps),
        ):
            with pytest.raises(ValueError):
                call()


def test_negative_total_norm_raises_value_error():
    xs = [np.ones(3, np.float32), np.ones(2, np.float32)]
    with unchanged(*xs), pytest.raises(ValueError):
        fastclip.clip_by_global_norm_(xs, 1.0, total_norm=-1.0)


@pytest.mark.parametrize(
    ("bounds", "exc"),
    [
        ((1.0, -1.0), ValueError),  # min > max
        ((None, None), ValueError),  # no bound at all
        ((math.nan, 1.0), ValueError),
        ((-1.0, math.nan), ValueError),
        (("a", 1.0), TypeError),
        ((-1.0, True), TypeError),
    ],
    ids=repr,
)
@pytest.mark.parametrize(
    "backend", [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT], ids=str
)
def test_bad_bounds(backend, bounds, exc):
    x = backend.asarray(sample((3, 4), seed=4), "float32")
    before = backend.to_numpy(x)
    for func in (fastclip.clip_by_value, fastclip.clip_by_value_):
        with pytest.raises(exc):
            func(x, *bounds)
    np.testing.assert_array_equal(backend.to_numpy(x), before)


@pytest.mark.parametrize(
    "ord", [0, -1, -math.inf, math.nan, "fro", "nuc", None, True, 1 + 1j], ids=repr
)
@pytest.mark.parametrize(
    "backend", [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT], ids=str
)
def test_invalid_ord_raises_value_error(backend, ord):
    x = backend.asarray(sample((3, 4), seed=5), "float32")
    xs = [x, backend.asarray(np.ones(2), "float32")]
    before = [backend.to_numpy(a) for a in xs]
    for _name, func in NORM_FUNCS:
        with pytest.raises(ValueError):
            func(x, ord=ord)
    for _name, func in GLOBAL_FUNCS:
        with pytest.raises(ValueError):
            func(xs, ord=ord)
    for a, b in zip(xs, before):
        np.testing.assert_array_equal(backend.to_numpy(a), b)


@pytest.mark.parametrize(
    ("axis", "exc"),
    [
        (2, AxisError),
        (-3, AxisError),
        ((0, 5), AxisError),
        ((0, 0), ValueError),
        ((1, -1), ValueError),
        (1.0, TypeError),
        ((0, 1.5), TypeError),
        ("0", TypeError),
    ],
    ids=repr,
)
@pytest.mark.parametrize(
    "backend", [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT], ids=str
)
def test_invalid_axis(backend, axis, exc):
    assert issubclass(AxisError, ValueError)
    x = backend.asarray(sample((3, 4), seed=6), "float32")
    before = backend.to_numpy(x)
    for _name, func in NORM_FUNCS:
        with pytest.raises(exc):
            func(x, axis=axis)
    np.testing.assert_array_equal(backend.to_numpy(x), before)


# ---------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
@pytest.mark.parametrize(
    "backend", [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT], ids=str
)
def test_integer_and_bool_arrays_to_norm_functions_raise_type_error(backend, dtype):
    x = backend.asarray(np.arange(6).reshape(2, 3) % 2, dtype)
    f = backend.asarray(np.ones(3), "float32")
    before = backend.to_numpy(x)
    for _name, func in NORM_FUNCS:
        with pytest.raises(TypeError):
            func(x)
    for _name, func in GLOBAL_FUNCS:
        with pytest.raises(TypeError):
            func([f, x])  # the float array comes first and must not be clipped either
    np.testing.assert_array_equal(backend.to_numpy(x), before)
    np.testing.assert_array_equal(backend.to_numpy(f), np.ones(3))


@pytest.mark.parametrize(
    "backend", [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT], ids=str
)
def test_complex_clip_by_value_raises_type_error(backend):
    x = backend.asarray(sample(4, seed=7, kind="complex"), "complex64")
    before = backend.to_numpy(x)
    for func in (fastclip.clip_by_value, fastclip.clip_by_value_):
        with pytest.raises(TypeError):
            func(x, -1, 1)
    np.testing.assert_array_equal(backend.to_numpy(x), before)


# ------------------------------------------------------- read-only arrays


def _readonly(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("count", [2, 8, 12])
@pytest.mark.parametrize(("name", "func"), IN_PLACE_GLOBAL, ids=ids(IN_PLACE_GLOBAL))
def test_only_the_last_array_read_only_modifies_nothing(name, func, count):
    """Validation of all arrays happens before the first write (bulk-header path at >= 8)."""
    arrays = [np.array(sample(50, seed=i), np.float32) for i in range(count - 1)]
    arrays.append(_readonly(np.array(sample(50, seed=99), np.float32)))
    with unchanged(*arrays), pytest.raises(ValueError):
        func(arrays)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64"])
def test_numpy_readonly_backend_in_place_raises_value_error(dtype):
    b = Backend.NUMPY_READONLY
    x = b.asarray(sample((3, 4), seed=10), dtype)
    calls = [lambda: fastclip.clip_by_value_(x, -0.1, 0.1)]
    if dtype not in ("int32", "int64"):
        calls += [
            lambda: fastclip.clip_by_norm_(x, 0.1),
            lambda: fastclip.normalize_(x),
            lambda: fastclip.clip_by_norm_(x, 0.1, axis=0),
            lambda: fastclip.clip_by_norm_(x, 0.1, axis=1),
            lambda: fastclip.normalize_(x, axis=1),
            lambda: fastclip.clip_by_global_norm_([x], 0.1),
            lambda: fastclip.clip_by_global_norm_([b.asarray(np.ones(3), dtype), x], 0.1),
            lambda: fastclip.scale_([x], 0.5),
        ]
    for call in calls:
        with unchanged(x), pytest.raises(ValueError):
            call()


# ---------------------------------------- elements sharing memory (stride 0)


def _self_overlapping(kind, dtype):
    """An in-place target whose 4 rows are one memory location each column."""
    row = sample((1, 3), seed=65)
    if kind == "torch":
        return torch.tensor(row, dtype=getattr(torch, dtype)).expand(4, 3)
    base = np.array(row, dtype)
    return np.lib.stride_tricks.as_strided(base, (4, 3), (0, base.itemsize))  # writeable


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_in_place_on_stride_0_views_raises_value_error_and_writes_nothing(kind, dtype):
    """torch refuses in-place ops on expanded tensors; so does every in-place function,
    before any write (the other arrays of a global call included)."""
    x = _self_overlapping(kind, dtype)
    others = [np.array(sample(6, seed=i), dtype) for i in range(9)]
    if kind == "torch":
        others = [torch.from_numpy(o) for o in others]
    calls = [
        lambda: fastclip.clip_by_norm_(x, 0.1),
        lambda: fastclip.clip_by_norm_(x, 0.1, axis=1),
        lambda: fastclip.normalize_(x),
        lambda: fastclip.clip_by_value_(x, -0.1, 0.1),
        lambda: fastclip.clip_by_global_norm_([*others[:1], x], 0.1),
        lambda: fastclip.clip_by_global_norm_([*others, x], 0.1),
        lambda: fastclip.scale_([*others, x], 0.5),
    ]
    if kind == "torch":
        p = torch.nn.Parameter(torch.zeros(4, 3, dtype=x.dtype))
        p.grad = x
        calls.append(lambda: fct.clip_grad_norm_([p], 0.1))
        calls.append(lambda: fct.clip_grad_value_([p], 0.1))
    for call in calls:
        with unchanged(x, *others), pytest.raises(ValueError, match="share memory"):
            call()
    # out of place it is an ordinary (broadcast) array
    assert_close(to_f64(fastclip.clip_by_norm(x, 0.1)), ref.clip_by_norm(to_f64(x), 0.1), dtype)


def test_sparse_tensors_raise_type_error_and_write_nothing():
    """Sparse gradients (``nn.Embedding(sparse=True)``): a TypeError naming the
    layout, before any write; torch.nn.utils cannot clip them either."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    g = emb.weight.grad
    assert g.layout is torch.sparse_coo
    dense = [torch.tensor(sample(6, seed=i), dtype=torch.float32) for i in range(9)]
    calls = [
        lambda: fastclip.norm(g),
        lambda: fastclip.clip_by_norm_(g, 0.1),
        lambda: fastclip.clip_by_value_(g, -0.1, 0.1),
        lambda: fastclip.global_norm([*dense, g]),
        lambda: fastclip.clip_by_global_norm_([*dense[:1], g], 0.1),
        lambda: fastclip.clip_by_global_norm_([*dense, g], 0.1),
        lambda: fct.clip_grad_norm_(emb.parameters(), 0.1),
        lambda: fct.clip_grad_value_(emb.parameters(), 0.1),
    ]
    before = g.to_dense().clone()
    for call in calls:
        with unchanged(*dense), pytest.raises(TypeError, match=r"dense \(strided\) tensors"):
            call()
        assert torch.equal(g.to_dense(), before)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself
def test_numpy_subclasses_masked_refused_matrix_taken_as_its_memory():
    """Masked arrays would have their mask ignored: TypeError, nothing written.
    Other ndarray subclasses (np.matrix) are clipped through a plain view of
    their memory, in place or out of place."""
    data = np.array(sample((2, 3), seed=66), np.float32)
    masked = np.ma.array(data.copy(), mask=[[0, 1, 0], [0, 0, 1]])
    plain = [np.array(sample(4, seed=i), np.float32) for i in range(9)]
    for call in (
        lambda: fastclip.norm(masked),
        lambda: fastclip.clip_by_norm_(masked, 0.1),
        lambda: fastclip.clip_by_value_(masked, -0.1, 0.1),
        lambda: fastclip.clip_by_global_norm_([*plain, masked], 0.1),
    ):
        with unchanged(masked.data, *plain), pytest.raises(TypeError, match="masked"):
            call()
    m = np.matrix(data.copy())
    assert_close(fastclip.norm(m), ref.norm(data), "float32")
    assert_close(np.asarray(fastclip.clip_by_norm(m, 0.1)), ref.clip_by_norm(data, 0.1), "float32")
    assert_close(fastclip.norm(m, axis=1), ref.norm(data, axis=1), "float32")
    fastclip.clip_by_norm_(m, 0.1, axis=1)
    assert_close(np.asarray(m), ref.clip_by_norm(data, 0.1, axis=1), "float32")


@pytest.mark.parametrize(
    "values",
    [np.array(["a", "b"]), np.array([1, "a"], object), np.array(["2020-01-01"], "datetime64[D]")],
    ids=["str", "object", "datetime"],
)
def test_clip_by_value_of_non_numeric_arrays_raises_type_error(values):
    for call in (
        lambda: fastclip.clip_by_value(values, 0, 1),
        lambda: fastclip.clip_by_value_(values, 0, 1),
    ):
        with unchanged(values), pytest.raises(TypeError, match="numeric"):
            call()


def test_a_mapping_of_arrays_is_refused_with_a_hint():
    grads = {"w": np.ones(3, np.float32)}
    for call in (
        lambda: fastclip.global_norm(grads),
        lambda: fastclip.clip_by_global_norm_(grads, 0.1),
    ):
        with unchanged(grads["w"]), pytest.raises(TypeError, match="values"):
            call()


def test_clip_coefficient_bad_total_norm():
    with pytest.raises(ValueError, match="total_norm"):
        fastclip.clip_coefficient(-1.0, 1.0)
    with pytest.raises(TypeError, match="total_norm"):
        fastclip.clip_coefficient("a", 1.0)
    with pytest.raises(TypeError, match="total_norm"):
        fastclip.clip_coefficient(None, 1.0)


# ------------------------------------------------------ mixed libraries


@pytest.mark.parametrize("count", [2, 9])
def test_arrays_from_different_libraries_raise_type_error(count):
    import array_api_strict as xp

    np_arrays = [np.array(sample(10, seed=i), np.float32) for i in range(count - 1)]
    t = torch.tensor(sample(10, seed=50), dtype=torch.float32)
    s = xp.asarray(sample(10, seed=51).astype(np.float32))
    for mixed in ([*np_arrays, t], [t, *np_arrays], [*np_arrays, s], [s, t]):
        for _name, func in GLOBAL_FUNCS + IN_PLACE_GLOBAL:
            with unchanged(*np_arrays, t), pytest.raises(TypeError):
                func(mixed)


def test_not_an_array_messages_say_what_to_do():
    for bad in ([3.0, 4.0], (3.0, 4.0), 3.0, 2):
        with pytest.raises(TypeError, match=r"np\.asarray\(x\)"):
            fastclip.norm(bad)
    with pytest.raises(TypeError, match=r"got builtins\.str$"):
        fastclip.norm("abc")  # no hint that would not help


def test_pandas_message_says_to_numpy():
    pd = pytest.importorskip("pandas")
    with pytest.raises(TypeError, match=r"to_numpy\(\)"):
        fastclip.norm(pd.Series([3.0, 4.0]))


def test_mixed_libraries_message_names_them():
    import array_api_strict as xp

    a = np.ones(3, np.float32)
    with pytest.raises(TypeError, match=r"got numpy and array_api_strict$"):
        fastclip.global_norm([a, xp.asarray(a)])
    with pytest.raises(TypeError, match=r"got numpy and torch$"):
        fastclip.global_norm([a, torch.ones(3)])
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match=r"got numpy and jax$"):
        fastclip.global_norm([a, jnp.ones(3)])


def test_tensors_on_different_devices_raise():
    cpu = [torch.tensor(sample(10, seed=i), dtype=torch.float32) for i in range(3)]
    meta = torch.empty(10, device="meta")
    for mixed in ([*cpu, meta], [meta, *cpu]):
        for _name, func in GLOBAL_FUNCS + IN_PLACE_GLOBAL:
            with unchanged(*cpu), pytest.raises(TypeError, match="device"):
                func(mixed)


# ------------------------------------------------------- overlapping memory


def _overlap_cases():
    yield "same-array-twice", lambda a: [a, a]
    yield "same-among-many", lambda a: [np.ones(3, np.float32) for _ in range(8)] + [a, a[:]]
    yield "overlapping-slices", lambda a: [a[:25], a[20:]]
    yield "view-and-base", lambda a: [a, a[5:10]]
    yield "strided-subset", lambda a: [a[::2], a[::4]]
    yield "2d-columns", lambda a: [a.reshape(5, 8)[:, ::2], a.reshape(5, 8)[:, 2:3]]


@pytest.mark.parametrize("case", [c[0] for c in _overlap_cases()])
@pytest.mark.parametrize(("name", "func"), IN_PLACE_GLOBAL, ids=ids(IN_PLACE_GLOBAL))
def test_overlapping_arrays_in_one_in_place_call_raise_value_error(name, func, case):
    make = next(m for c, m in _overlap_cases() if c == case)
    a = np.array(sample(40, seed=60), np.float32)
    arrays = make(a)
    with unchanged(a, *arrays), pytest.raises(ValueError):
        func(arrays)


@pytest.mark.parametrize(("name", "func"), IN_PLACE_GLOBAL, ids=ids(IN_PLACE_GLOBAL))
def test_same_tensor_twice_raises_value_error(name, func):
    t = torch.tensor(sample(30, seed=61), dtype=torch.float32)
    for arrays in (
        [t, t],
        [t[:20], t[10:]],
        [torch.ones(3) for _ in range(8)] + [t, t.view(3, 10)],
    ):
        with unchanged(t), pytest.raises(ValueError):
            func(arrays)


@pytest.mark.parametrize("backend", [Backend.NUMPY, Backend.TORCH], ids=str)
def test_interleaved_views_that_share_no_element_are_fine(backend):
    base = backend.asarray(sample((6, 8), seed=62), "float32")
    for pick in (lambda a: [a[::2], a[1::2]], lambda a: [a[:, ::2], a[:, 1::2]]):
        expected, total = ref.clip_by_global_norm(pick(backend.to_numpy(base)), 1.0)
        views = pick(base)
        got = fastclip.clip_by_global_norm_(views, 1.0)
        assert_close(backend.to_numpy(got), total, "float32")
        for v, e in zip(views, expected):
            assert_close(backend.to_numpy(v), e, "float32")


# -------------------------------------------------- immutable / strict arrays


def test_array_api_strict_in_place_modifies_the_array():
    """array-api-strict arrays are writeable, so in-place works on them (JAX's would raise)."""
    import array_api_strict as xp

    data = sample((3, 4), seed=63)
    x = xp.asarray(data.copy())  # its own memory: asarray may share NumPy's
    norms = fastclip.clip_by_norm_(x, 0.5, axis=1)
    assert_close(np.from_dlpack(norms), ref.norm(data, axis=1), "float64")
    assert_close(np.from_dlpack(x), ref.clip_by_norm(data, 0.5, axis=1), "float64")
    xs = [xp.asarray(data.copy()), xp.asarray(data[0].copy())]
    total = fastclip.clip_by_global_norm_(xs, 0.5)
    expected, expected_total = ref.clip_by_global_norm([data, data[0]], 0.5)
    assert_close(np.from_dlpack(total), expected_total, "float64")
    for a, e in zip(xs, expected):
        assert_close(np.from_dlpack(a), e, "float64")


def test_torch_drop_ins_refuse_arrays_for_parameters():
    """fastclip.torch's functions take parameters (tensors with .grad); NumPy arrays
    get a TypeError saying so and naming the functions for arrays, not an
    AttributeError."""
    g = np.ones(3, np.float32)
    for call in (
        lambda: fct.clip_grad_norm_([g], 1.0),
        lambda: fct.clip_grad_value_([g], 1.0),
        lambda: fct.clip_grads_with_norm_([g], 1.0, torch.tensor(2.0)),
    ):
        with unchanged(g), pytest.raises(TypeError, match="clip_by_global_norm_") as info:
            call()
        assert "numpy.ndarray" in str(info.value)
