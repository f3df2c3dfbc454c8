"""torch's in-place rule on the top-level in-place functions, and value clipping of
lists (``clip_by_value`` / ``clip_by_value_`` of many arrays).

This file owns both behaviours on the backend matrix; the single-array value
clip is tested in ``test_clip_value.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastclip
from tests import reference as ref
from tests._backends import Backend, assert_close

torch = pytest.importorskip("torch")

# (name, whether it writes every tensor of the list, call)
INPLACE_CALLS = [
    ("clip_by_value_", False, lambda xs: fastclip.clip_by_value_(xs[0], -0.1, 0.1)),
    ("clip_by_value_", True, lambda xs: fastclip.clip_by_value_(xs, -0.1, 0.1)),
    ("clip_by_norm_", False, lambda xs: fastclip.clip_by_norm_(xs[0], 0.5)),
    ("clip_by_norm_", False, lambda xs: fastclip.clip_by_norm_(xs[0], 0.5, axis=0)),
    ("normalize_", False, lambda xs: fastclip.normalize_(xs[0])),
    ("clip_by_global_norm_", True, lambda xs: fastclip.clip_by_global_norm_(xs, 0.5)),
    ("clip_by_global_norm_", False, lambda xs: fastclip.clip_by_global_norm_(xs[:1], 0.5)),
    ("scale_", True, lambda xs: fastclip.scale_(xs, 0.5)),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(INPLACE_CALLS)]


def _tensors(requires_grad: set[int]) -> list:
    rng = np.random.default_rng(0)
    out = []
    for i, shape in enumerate([(4, 3), (5,), (2, 2)]):
        t = torch.tensor(rng.standard_normal(shape) * 2, dtype=torch.float32)
        out.append(t.requires_grad_(i in requires_grad))
    return out


def _expected(call) -> list:
    """What the call writes into plain tensors (no grad): the reference result."""
    xs = _tensors(set())
    call(xs)
    return xs


@pytest.mark.parametrize(("name", "whole_list", "call"), INPLACE_CALLS, ids=IDS)
@pytest.mark.parametrize("at", [0, 1])
def test_leaf_that_requires_grad_is_refused_before_any_write(name, whole_list, call, at):
    xs = _tensors({at})
    before = [t.detach().clone() for t in xs]
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        xs[at].mul_(0.5)  # torch's own rule for the same tensor
    if at == 1 and not whole_list:
        call(xs)  # tensor 1 is not an argument: nothing to refuse
        for t, e in zip(xs, _expected(call)):
            assert torch.equal(t.detach(), e)
        return
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad") as info:
        call(xs)
    message = str(info.value)
    assert message.startswith(f"fastclip.{name}: ")  # the public name, then the argument
    assert "fastclip.torch.clip_grad_norm_" in message
    assert "torch.no_grad()" in message
    for t, b in zip(xs, before):
        assert torch.equal(t.detach(), b)


@pytest.mark.parametrize(("name", "whole_list", "call"), INPLACE_CALLS, ids=IDS)
def test_non_leaf_that_requires_grad_is_refused(name, whole_list, call):
    leaf = torch.ones(3, 4, requires_grad=True)
    xs = [leaf * 2.0, (leaf * 3.0)[0], (leaf + 1.0)[:2, :2]]
    before = [t.detach().clone() for t in xs]
    with pytest.raises(RuntimeError, match="is a tensor that requires grad") as info:
        call(xs)
    assert str(info.value).startswith(f"fastclip.{name}: ")
    for t, b in zip(xs, before):
        assert torch.equal(t.detach(), b)


@pytest.mark.parametrize(("name", "whole_list", "call"), INPLACE_CALLS, ids=IDS)
def test_under_no_grad_the_same_calls_write(name, whole_list, call):
    xs = _tensors({0, 1, 2})
    with torch.no_grad():
        call(xs)
    for t, e in zip(xs, _expected(call)):
        assert t.requires_grad and t.is_leaf
        assert torch.equal(t.detach(), e)


def test_gradients_are_clipped_with_grad_mode_on():
    model = torch.nn.Linear(4, 3)
    model(torch.ones(2, 4)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    expected, norm = ref.clip_by_global_norm([g.numpy() for g in grads], 0.1)
    assert torch.is_grad_enabled()
    total = fastclip.clip_by_global_norm_(grads, 0.1)
    assert_close(total.numpy(), norm, "float32")
    for g, e in zip(grads, expected):
        assert_close(g.numpy(), e, "float32")


def test_wgan_weight_clipping_of_a_whole_model_is_one_line():
    critic = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    twin = [p.detach().clone() * 10.0 for p in critic.parameters()]
    with torch.no_grad():
        for p in critic.parameters():
            p.mul_(10.0)
    versions = [p._version for p in critic.parameters()]
    with torch.no_grad():
        fastclip.clip_by_value_(critic.parameters(), -0.01, 0.01)
    for p, t, v in zip(critic.parameters(), twin, versions):
        assert torch.equal(p.detach(), t.clamp_(-0.01, 0.01))  # torch's own clamp
        assert p._version > v  # autograd sees the write
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
        fastclip.clip_by_value_(critic.parameters(), -0.01, 0.01)


# ------------------------------------------------------------ lists of arrays


def _list(backend: Backend, dtypes: tuple[str, ...]) -> tuple[list, list]:
    rng = np.random.default_rng(1)
    data = [rng.standard_normal(s) * 3 for s in [(7,), (3, 5), (0,), (200,)]]
    arrays = [backend.asarray(d, dt) for d, dt in zip(data, dtypes)]
    return data, arrays


FLOAT_SETS = [("float32",) * 4, ("float64", "float32", "float64", "float32")]


@pytest.mark.parametrize("dtypes", FLOAT_SETS, ids=["f32", "mixed"])
def test_clip_by_value_of_a_list_gives_new_arrays(backend, dtypes):
    if not set(dtypes) <= set(backend.float_dtypes):
        pytest.skip(f"{backend} has no {dtypes}")
    data, arrays = _list(backend, dtypes)
    before = [backend.to_numpy(a).copy() for a in arrays]
    out = fastclip.clip_by_value(arrays, -1.0, 2.0)
    assert isinstance(out, list) and len(out) == len(arrays)
    for o, a, d, dt, b in zip(out, arrays, data, dtypes, before):
        assert o is not a
        backend.assert_array(o, a, dt, d.shape)
        expected = ref.clip_by_value(backend.round_to(d, dt), -1.0, 2.0)
        np.testing.assert_array_equal(backend.to_numpy(o), expected)
        np.testing.assert_array_equal(backend.to_numpy(a), b)  # inputs untouched


@pytest.mark.parametrize("dtypes", FLOAT_SETS, ids=["f32", "mixed"])
def test_clip_by_value_in_place_of_a_list(backend, dtypes):
    if not set(dtypes) <= set(backend.float_dtypes):
        pytest.skip(f"{backend} has no {dtypes}")
    data, arrays = _list(backend, dtypes)
    if not backend.writeable:
        with pytest.raises(ValueError, match="read-only"):
            fastclip.clip_by_value_(arrays, -1.0, 2.0)
        for a, d, dt in zip(arrays, data, dtypes):
            np.testing.assert_array_equal(backend.to_numpy(a), backend.round_to(d, dt))
        return
    result = fastclip.clip_by_value_(iter(arrays), -1.0, 2.0)  # any iterable
    assert len(result) == len(arrays) and all(r is a for r, a in zip(result, arrays))
    for a, d, dt in zip(arrays, data, dtypes):
        expected = ref.clip_by_value(backend.round_to(d, dt), -1.0, 2.0)
        np.testing.assert_array_equal(backend.to_numpy(a), expected)


def test_clip_by_value_of_a_list_with_integers_and_strided_views():
    ints = np.array([-5, 0, 7], np.int32)
    base = np.arange(24, dtype=np.float32).reshape(4, 6) - 10
    view = base[:, ::2]
    out = fastclip.clip_by_value([ints, view], -2, 3)
    np.testing.assert_array_equal(out[0], np.clip(ints, -2, 3))
    np.testing.assert_array_equal(out[1], np.clip(view, -2, 3))
    np.testing.assert_array_equal(base, np.arange(24, dtype=np.float32).reshape(4, 6) - 10)
    fastclip.clip_by_value_([ints, view], -2, 3)
    np.testing.assert_array_equal(ints, np.clip(np.array([-5, 0, 7]), -2, 3))
    expected = np.arange(24, dtype=np.float32).reshape(4, 6) - 10
    expected[:, ::2] = np.clip(expected[:, ::2], -2, 3)
    np.testing.assert_array_equal(base, expected)


def test_refused_list_is_left_unchanged():
    good = np.array([5.0, -5.0])
    bad = np.array([1.0 + 2j])
    with pytest.raises(TypeError, match="complex"):
        fastclip.clip_by_value_([good, bad], -1, 1)
    np.testing.assert_array_equal(good, [5.0, -5.0])
    with pytest.raises(TypeError, match="complex"):
        fastclip.clip_by_value([good, bad], -1, 1)
    assert fastclip.clip_by_value([], -1, 1) == []
    assert fastclip.clip_by_value_([], -1, 1) == []
