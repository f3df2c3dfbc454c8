"""One zero-norm rule on every route: the clip coefficient of ``fastclip._formulas``.

This file owns the zero-norm rule on every route (matrix, Dask, fused steps, per-sample,
CUDA sources); the operations' other values are in their own test_<op>.py.

``min(1, c / (norm + eps))``, 1 where ``norm + eps == 0`` (0 / 0: nothing to
clip), 0 for an infinite norm, NaN for a NaN norm.  Each route is observed
through what it writes: an element ``v`` next to the special values comes out
as ``coef * v`` (``coef * 0`` for the zero norm, where NaN would show).

Before the rule was written once, the per-sample routes gave 1 for any zero
norm (so ``max_norm = 0`` with ``eps > 0`` reported factor 1 where torch and
Opacus give 0), and the CUDA per-axis kernel gave NaN for 0 / 0.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import reference as ref
from _backends import WRITEABLE, Backend, params

import fastclip
from fastclip import _formulas

# (name, data, max_norm, eps): the special norms of the rule
CASES = [
    ("zero norm, eps 0, c 0", [0.0, 0.0], 0.0, 0.0),
    ("zero norm, eps 0, c 1", [0.0, 0.0], 1.0, 0.0),
    ("zero norm, eps 1e-6, c 0", [0.0, 0.0], 0.0, 1e-6),
    ("inf norm", [math.inf, 2.0], 1.0, 0.0),
    ("nan norm", [math.nan, 2.0], 1.0, 0.0),
]
IDS = [c[0] for c in CASES]


def _norm(data):
    a = np.asarray(data, np.float64)
    return (
        float(np.max(np.abs(a)))
        if np.isnan(a).any() or np.isinf(a).any()
        else float(np.linalg.norm(a))
    )


def _expected(data, c, eps):
    """What ``x * coef`` must be for the last element, from the float64 oracle."""
    coef = float(ref.coefficient(_norm(data), c, eps))
    return coef, coef * data[-1]


def _same(got, want):
    if math.isnan(want):
        assert math.isnan(got), (got, want)
    else:
        assert got == want, (got, want)


@pytest.mark.parametrize(("name", "data", "c", "eps"), CASES, ids=IDS)
def test_formula_itself_matches_the_oracle(name, data, c, eps):
    coef, _ = _expected(data, c, eps)
    _same(_formulas.clip_coefficient(c, _norm(data), eps), coef)
    _same(float(_formulas.clip_coefficients(np.array([_norm(data)]), c, eps)[0]), coef)
    _same(fastclip.clip_coefficient(_norm(data), c, eps), coef)
    _same(float(fastclip.clip_coefficient(np.asarray(_norm(data)), c, eps)), coef)


@pytest.mark.parametrize(("name", "data", "c", "eps"), CASES, ids=IDS)
def test_core_routes(backend: Backend, name, data, c, eps):
    """clip_by_norm (whole and per axis) and clip_by_global_norm, out of place."""
    _, want = _expected(data, c, eps)
    x = backend.asarray(np.asarray(data), "float64")
    _same(float(backend.to_numpy(fastclip.clip_by_norm(x, c, eps=eps))[-1]), want)
    x2 = backend.asarray(np.asarray([data]), "float64")
    _same(float(backend.to_numpy(fastclip.clip_by_norm(x2, c, axis=1, eps=eps))[0, -1]), want)
    outs, _ = fastclip.clip_by_global_norm([x], c, eps=eps)
    _same(float(backend.to_numpy(outs[0])[-1]), want)


@pytest.mark.parametrize(("name", "data", "c", "eps"), CASES, ids=IDS)
def test_dask_route(name, data, c, eps):
    da = pytest.importorskip("dask.array")
    _, want = _expected(data, c, eps)
    x = da.from_array(np.asarray(data), chunks=1)
    _same(float(fastclip.clip_by_norm(x, c, eps=eps).compute()[-1]), want)
    outs, _ = fastclip.clip_by_global_norm([x], c, eps=eps)
    _same(float(outs[0].compute()[-1]), want)


@pytest.mark.parametrize(("name", "data", "c", "eps"), CASES, ids=IDS)
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_fused_optimizers(library, name, data, c, eps):
    """SGD without momentum: p - lr * coef * g, so the coefficient shows in p."""
    coef, _ = _expected(data, c, eps)
    g64 = np.asarray(data)
    if library == "torch":
        torch = pytest.importorskip("torch")
        p, g = torch.ones(2, dtype=torch.float64), torch.tensor(g64)
    else:
        p, g = np.ones(2), g64.copy()
    fastclip.optim.sgd_step_([p], [g], lr=1.0, max_norm=c, clip_eps=eps)
    _same(float(np.asarray(p)[-1]), 1.0 - coef * data[-1])


@pytest.mark.parametrize(("name", "data", "c", "eps"), CASES, ids=IDS)
@pytest.mark.parametrize("per_layer", [False, True])
def test_per_sample(backend: Backend, per_layer, name, data, c, eps):
    """Sample 0 holds the special values, sample 1 is zero; the clipped count shows
    the factors themselves (a zero sample's factor is 0 for ``c = 0, eps > 0``)."""
    coef, want = _expected(data, c, eps)
    coef_zero = float(ref.coefficient(0.0, c, eps))
    g = backend.asarray(np.asarray([data, [0.0, 0.0]]), "float64")
    res = fastclip.clip_per_sample(g, c, eps=eps, reduce=None, per_layer=per_layer)
    _same(float(backend.to_numpy(res.grads)[0, -1]), want)
    assert res.n_clipped == int(coef < 1.0) + int(coef_zero < 1.0)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(("backend", "dtype"), params(WRITEABLE))
def test_zero_norms_with_eps_zero_every_dtype_in_and_out_of_place(backend, dtype, inplace):
    """max_norm = 0, eps = 0 and all-zero arrays: 0 / 0 is taken as "nothing to clip"
    (coefficient 1) everywhere, as clip_coefficient says, never NaN."""
    arrays = [backend.asarray(np.zeros(s), dtype) for s in [(3, 4), (5,)]]
    if inplace:
        total = fastclip.clip_by_global_norm_(arrays, 0.0, eps=0.0)
        outs = arrays
    else:
        outs, total = fastclip.clip_by_global_norm(arrays, 0.0, eps=0.0)
    assert float(total) == 0.0
    for o in outs:
        assert np.all(backend.to_numpy(o) == 0.0)
    x = backend.asarray(np.array([[0.0, 0.0], [3.0, 4.0]]), dtype)
    y = fastclip.clip_by_norm(x, 0.0, axis=1, eps=0.0)  # zero row kept, other row -> 0
    assert np.array_equal(backend.to_numpy(y), np.zeros((2, 2)))
    assert float(fastclip.clip_coefficient(0.0, 0.0, eps=0.0)) == 1.0
    c = fastclip.clip_coefficient(backend.asarray(np.zeros(()), dtype), 0.0, eps=0.0)
    assert float(backend.to_numpy(c)) == 1.0


def test_cuda_sources_write_the_same_rule():
    """Every clip coefficient in the CUDA sources has the 0 / 0 clause (they cannot
    run here; the real-GPU tests in test_gpu*.py check their values on a device)."""
    sources = Path(fastclip.__file__).parent / "_gpu"
    sites = []
    for cu in sorted(sources.glob("*.cu")):
        for n, line in enumerate(cu.read_text().splitlines(), 1):
            if re.search(r"\br >= 1\.0\b", line):
                sites.append((cu.name, n, line))
    assert len(sites) >= 3, sites  # the global finish, the per-axis and per-sample kernels
    for name, n, line in sites:
        assert "den == 0.0" in line, f"{name}:{n} lacks the zero-norm rule: {line.strip()}"
