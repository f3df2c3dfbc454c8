"""Which arrays make a norm non-finite: ``NonFiniteNormError.indices`` and ``.names``.

On every route ``error_if_nonfinite=True`` raises before any write, and the
error names the positions (in the caller's list) of the arrays whose own norm
is NaN or inf, as the float64 oracle finds them; ``fastclip.torch`` also takes
an ``nn.Module`` and then names the parameters.  torch's own message stays the
start of fastclip.torch's.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import reference as ref
from _backends import CPU, WRITEABLE, Backend, backend_params, sample

import fastclip
from fastclip import NonFiniteNormError


def _poisoned(backend, dtype="float32"):
    """Five arrays, NaN in array 1 and inf in array 3 (and a zero-size array 2)."""
    data = [sample(4, seed=0), sample(6, seed=1), np.zeros(0), sample(3, seed=3), sample(5, seed=4)]
    data[1][2] = np.nan
    data[3][0] = np.inf
    return [backend.asarray(d, dtype) for d in data]


def _expected_indices(backend, arrays, ord):
    norms = [ref.norm(backend.to_numpy(a), ord) for a in arrays]
    return tuple(i for i, n in enumerate(norms) if not math.isfinite(float(n)))


def _same(backend, a, b):
    np.testing.assert_array_equal(backend.to_numpy(a), b)  # NaN == NaN here


@pytest.mark.parametrize("ord", [2, 1, math.inf, 3], ids=str)
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("backend", backend_params(list(Backend)))
def test_indices_on_every_route_and_nothing_written(backend, inplace, ord):
    if inplace and not backend.writeable:
        pytest.skip("read-only arrays are refused before the norm (test_per_array.py)")
    arrays = _poisoned(backend)
    before = [backend.to_numpy(a) for a in arrays]
    clip = fastclip.clip_by_global_norm_ if inplace else fastclip.clip_by_global_norm
    with pytest.raises(NonFiniteNormError, match=r"arrays 1 and 3\)") as info:
        clip(arrays, 1.0, ord, error_if_nonfinite=True)
    assert isinstance(info.value, RuntimeError)
    assert info.value.indices == _expected_indices(backend, arrays, ord) == (1, 3)
    assert info.value.names is None
    for a, b in zip(arrays, before, strict=True):
        _same(backend, a, b)


@pytest.mark.parametrize("backend", backend_params(WRITEABLE))
def test_per_array_and_error_together(backend):
    arrays = _poisoned(backend)
    with pytest.raises(NonFiniteNormError) as info:
        fastclip.clip_by_global_norm_(arrays, 1.0, error_if_nonfinite=True, per_array=True)
    assert info.value.indices == (1, 3)


@pytest.mark.parametrize("backend", backend_params(CPU))
def test_only_the_sum_overflowed_gives_no_indices(backend):
    """Every array's norm is finite in float64, their total is not: ``indices`` is empty."""
    arrays = [backend.asarray(np.full(1, 1.5e308), "float64") for _ in range(2)]
    norms = [ref.norm(backend.to_numpy(a)) for a in arrays]
    assert all(math.isfinite(float(n)) for n in norms)
    assert not math.isfinite(float(ref.global_norm([backend.to_numpy(a) for a in arrays])))
    with pytest.raises(NonFiniteNormError) as info:
        fastclip.clip_by_global_norm(arrays, 1.0, error_if_nonfinite=True)
    assert info.value.indices == ()
    assert "non-finite norm" not in str(info.value)  # no culprit named


def test_given_nonfinite_total_reports_the_arrays_that_are():
    clean = [np.ones(3), np.ones(2)]
    with pytest.raises(NonFiniteNormError) as info:
        fastclip.clip_by_global_norm_(clean, 1.0, total_norm=math.inf, error_if_nonfinite=True)
    assert info.value.indices == ()
    np.testing.assert_array_equal(clean[0], np.ones(3))
    dirty = [np.ones(3), np.array([np.nan])]
    with pytest.raises(NonFiniteNormError) as info:
        fastclip.clip_by_global_norm_(dirty, 1.0, total_norm=math.nan, error_if_nonfinite=True)
    assert info.value.indices == (1,)


def test_mixed_dtypes_positions_are_the_callers():
    """Packing groups by dtype; the positions are still those of the caller's list."""
    arrays = [
        np.ones(3, np.float32),
        np.ones(2),
        np.array([np.inf], np.float32),
        np.array([np.nan]),
    ]
    with pytest.raises(NonFiniteNormError, match=r"arrays 2 and 3\)") as info:
        fastclip.clip_by_global_norm_(arrays, 1.0, error_if_nonfinite=True)
    assert info.value.indices == (2, 3)


def test_many_culprits_are_counted_in_the_message():
    arrays = [np.array([np.nan]) for _ in range(11)]
    with pytest.raises(NonFiniteNormError, match=r"arrays 0, 1, .*, 7 and 3 more\)") as info:
        fastclip.clip_by_global_norm_(arrays, 1.0, error_if_nonfinite=True)
    assert info.value.indices == tuple(range(11))


def test_dask_indices():
    da = pytest.importorskip("dask.array", reason="dask is not installed: no Dask route to test")
    data = [sample(8, seed=0), sample(5, seed=1), sample(6, seed=2)]
    data[2][4] = np.nan
    arrays = [da.from_array(d, chunks=3) for d in data]
    graphs = [a.name for a in arrays]
    with pytest.raises(NonFiniteNormError, match=r"array 2\)") as info:
        fastclip.clip_by_global_norm_(arrays, 1.0, error_if_nonfinite=True)
    assert info.value.indices == (2,)
    assert [a.name for a in arrays] == graphs  # nothing rebound


def test_error_class_contract():
    plain = NonFiniteNormError("message only")
    assert isinstance(plain, RuntimeError) and str(plain) == "message only"
    assert plain.indices == () and plain.names is None
    full = NonFiniteNormError("m", [3, 1], ["a.weight", "b"])
    assert full.indices == (3, 1) and full.names == ("a.weight", "b")
    back = pickle.loads(pickle.dumps(full))
    assert (str(back), back.indices, back.names) == ("m", (3, 1), ("a.weight", "b"))


# --------------------------------------------------------------- fastclip.torch


def _model(torch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()
    model[0].bias.grad = None  # skipped: positions are among the gradients that exist
    model[2].weight.grad[1, 1] = math.nan
    return model


def _torch_message(torch, model, norm_type):
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with pytest.raises(RuntimeError) as info:
        torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite=True)
    return str(info.value)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0, -1.0])
@pytest.mark.parametrize("how", ["module", "parameters"])
def test_torch_clip_grad_norm_names_the_parameter(norm_type, how):
    torch = pytest.importorskip("torch")
    import fastclip.torch as fct

    model = _model(torch)
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    target = model if how == "module" else model.parameters()
    with pytest.raises(NonFiniteNormError) as info:
        fct.clip_grad_norm_(target, 1.0, norm_type, error_if_nonfinite=True)
    # gradients that exist: 0.weight, 2.weight, 2.bias -> 2.weight is position 1
    assert info.value.indices == (1,)
    assert str(info.value).startswith(_torch_message(torch, model, norm_type))
    if how == "module":
        assert info.value.names == ("2.weight",)
        assert "parameter '2.weight'" in str(info.value)
    else:
        assert info.value.names is None and "gradient 1)" in str(info.value)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, before[n], equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 0.5])
def test_torch_get_total_norm_takes_a_module(norm_type):
    torch = pytest.importorskip("torch")
    import fastclip.torch as fct

    model = _model(torch)
    model[2].weight.grad[1, 1] = 0.25  # finite again
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    got = fct.get_total_norm(model, norm_type)
    torch.testing.assert_close(got, torch.nn.utils.get_total_norm(grads, norm_type))
    expected = ref.global_norm([g.double().numpy() for g in grads], norm_type)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    model[0].weight.grad[0, 0] = math.inf
    with pytest.raises(NonFiniteNormError) as info:
        fct.get_total_norm(model, norm_type, error_if_nonfinite=True)
    assert info.value.indices == (0,) and info.value.names == ("0.weight",)
    # the module's clip returns torch's norm and clips as torch does
    model[0].weight.grad[0, 0] = 1.0
    twin = [g.clone() for g in grads]
    total = fct.clip_grad_norm_(model, 0.1, norm_type)
    torch.testing.assert_close(
        total, torch.nn.utils.clip_grad_norm_(_as_params(torch, twin), 0.1, norm_type)
    )
    for g, t in zip(grads, twin, strict=True):
        torch.testing.assert_close(g, t)


def _as_params(torch, grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        params.append(p)
    return params
