"""Empty batches (B = 0) in ``clip_per_sample``, on every route, against Opacus.

Poisson sampling (Opacus' ``DPDataLoader``, arXiv:1607.00133 section 3.1) draws
each sample independently, so a batch can be empty; Opacus'
``DPOptimizer.clip_and_accumulate`` then uses a ``[0]`` factor vector and
sums to zeros, and ``scale_grad`` divides by the *expected* batch size, so the
mean gradient is zeros too.  fastclip returns zero sums and zero means, norms
of shape ``[0]`` (``[K, 0]`` per layer), ``n_clipped == 0`` and
``n_clipped_per_layer == (0,) * K``; ``reduce=None`` returns the empty arrays.

The GPU driver's empty-batch branch is checked here on the CPU through the
host emulation of its adapter (no kernel may be launched); it has not been
run on a GPU.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
from _backends import CPU, Backend, params
from _gpu_emulation import HostLib

import fastclip

SHAPES = [(0, 3, 2), (0, 4), (0,), (0, 0, 5)]  # a bias-like [B] array and a D = 0 one


def _empty(backend: Backend, dtype: str) -> list:
    return [backend.asarray(np.zeros(s), dtype) for s in SHAPES]


@pytest.mark.parametrize(
    ("backend", "dtype"),
    params([*CPU, Backend.TORCH_CUDA, Backend.CUPY], ("bfloat16", "float32", "float64")),
)
@pytest.mark.parametrize("reduce", ["sum", "mean", None])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("ord", [2, 1, math.inf, 3])
def test_empty_batch_on_every_route(backend, dtype, reduce, per_layer, ord) -> None:
    gs = _empty(backend, dtype)
    res = fastclip.clip_per_sample(gs, 1.0, ord, per_layer=per_layer, reduce=reduce)
    out, norms, n = res  # three-field unpacking, as before
    assert n == 0 and type(n) is int
    assert res.n_clipped_per_layer == (0,) * len(gs)
    nd = "float64" if dtype == "float64" else "float32"
    backend.assert_array(norms, gs[0], nd, (len(gs), 0) if per_layer else (0,))
    for g, o in zip(gs, out):
        shape = tuple(g.shape) if reduce is None else tuple(g.shape)[1:]
        backend.assert_array(o, g, dtype, shape)
        # the reference: Opacus' empty sum (and its mean over the expected batch size)
        np.testing.assert_array_equal(backend.to_numpy(o), np.zeros(shape))


def test_empty_batch_single_array_and_list_bounds() -> None:
    g = np.zeros((0, 7), np.float32)
    res = fastclip.clip_per_sample(g, 0.5)
    assert type(res.grads) is np.ndarray and res.grads.shape == (7,)
    assert not res.grads.any() and res.norms.shape == (0,) and res.n_clipped == 0
    res = fastclip.clip_per_sample([g, g[:, :2]], [1.0, 2.0], per_layer=True)
    assert res.norms.shape == (2, 0) and res.n_clipped_per_layer == (0, 0)


def test_empty_batch_on_the_dask_route() -> None:
    da = pytest.importorskip("dask.array")
    gs = [da.zeros((0, 3), chunks=(1, 2), dtype="float32"), da.zeros((0,), dtype="float32")]
    for reduce in ("sum", "mean"):
        res = fastclip.clip_per_sample(gs, 1.0, reduce=reduce)
        assert res.n_clipped == 0 and res.n_clipped_per_layer == (0, 0)
        np.testing.assert_array_equal(np.asarray(res.grads[0]), np.zeros(3, np.float32))
        assert np.asarray(res.grads[1]).shape == () and float(np.asarray(res.grads[1])) == 0.0
        assert tuple(res.norms.shape) == (0,)


def test_empty_batch_on_jax() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        jnp = pytest.importorskip("jax.numpy")
    gs = [jnp.zeros((0, 3), jnp.float32), jnp.zeros((0, 2, 2), jnp.float32)]
    res = fastclip.clip_per_sample(gs, 1.0, per_layer=True, reduce="mean")
    assert res.n_clipped == 0 and res.n_clipped_per_layer == (0, 0)
    assert tuple(res.norms.shape) == (2, 0)
    np.testing.assert_array_equal(np.asarray(res.grads[1]), np.zeros((2, 2)))


def test_an_empty_batch_still_validates_its_arguments() -> None:
    g = np.zeros((0, 3))
    with pytest.raises(ValueError, match="max_norm"):
        fastclip.clip_per_sample(g, -1.0)
    with pytest.raises(ValueError, match="batch size"):
        fastclip.clip_per_sample([g, np.zeros((1, 3))], 1.0)
    with pytest.raises(TypeError):
        fastclip.clip_per_sample(np.zeros((0, 3), np.int32), 1.0)
    with pytest.raises(ValueError, match="reduce"):
        fastclip.clip_per_sample(g, 1.0, reduce="max")


# ----------------------------------------------------------------- Opacus


@pytest.fixture(scope="module")
def opacus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch = pytest.importorskip("torch")
        pytest.importorskip("opacus")
        from opacus.optimizers import DPOptimizer
    return torch, DPOptimizer


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_empty_batch_against_opacus(opacus, dtype: str) -> None:
    """Opacus' own ``clip_and_accumulate`` and ``step`` on an empty Poisson batch."""
    torch, DPOptimizer = opacus
    tdt = getattr(torch, dtype)
    params = [torch.zeros(4, 3, dtype=tdt, requires_grad=True), torch.zeros(4, dtype=tdt)]
    params[1].requires_grad_(True)
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=tdt)
        p.grad = torch.zeros_like(p)
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=8,
        loss_reduction="mean",
    )
    gs = [p.grad_sample.clone() for p in params]
    opt.clip_and_accumulate()
    summed = fastclip.clip_per_sample(gs, 1.0)
    mean = fastclip.clip_per_sample(gs, 1.0, reduce="mean")
    for p, s, m in zip(params, summed.grads, mean.grads):
        assert s.dtype == p.summed_grad.dtype and s.shape == p.summed_grad.shape
        torch.testing.assert_close(s, p.summed_grad, rtol=0, atol=0)
        # Opacus' mean is the sum over its expected batch size: zeros as well
        torch.testing.assert_close(m, p.summed_grad / 8, rtol=0, atol=0)
    assert summed.n_clipped == 0 and tuple(summed.norms.shape) == (0,)


# ------------------------------------------------------- GPU driver (emulated)


class _Lib(HostLib):
    kind = staticmethod(lambda x: str(x.dtype))


@pytest.mark.parametrize("reduce", ["sum", "mean", None])
@pytest.mark.parametrize("per_layer", [False, True])
def test_gpu_driver_empty_batch_launches_nothing(monkeypatch, reduce, per_layer) -> None:
    """The GPU route's B = 0 branch, on host memory: no kernel, no host read, zeros."""
    from fastclip._gpu import _adapters, _modules
    from fastclip._gpu import _per_sample as gps

    def no_kernel(*args):
        raise AssertionError("an empty batch must launch no kernel")

    monkeypatch.setattr(_modules, "kernel", no_kernel)
    monkeypatch.setattr(_adapters, "on_device", lambda lib, like: contextlib.nullcontext())
    _Lib.syncs = 0
    gs = [np.zeros((0, 3, 2), np.float32), np.zeros((0,), np.float64)]
    outs, norms, n = gps.clip_per_sample_gpu(
        _Lib, gs, 0, 2, 2.0, np.ones(2), per_layer, reduce, 1e-6
    )
    assert n == 0 and _Lib.syncs == 0
    assert norms.dtype == np.float64 and norms.shape == ((2, 0) if per_layer else (0,))
    for g, o in zip(gs, outs):
        shape = g.shape if reduce is None else g.shape[1:]
        assert o.dtype == g.dtype and o.shape == shape
        np.testing.assert_array_equal(o, np.zeros(shape))
