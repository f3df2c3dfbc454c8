"""Edge cases where fastclip's answer differed from its peers' (torch.nn.utils, optax,
timm), each checked against the peer itself or its formula: gradients that require
grad in ``clip_grad_value_``, a parameter listed twice, ``error_if_nonfinite`` when the
norm overflows the returned dtype, empty arrays with an infinite bound, AGC's max-norm
of a zero-size parameter, and JAX / ml_dtypes bfloat16.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastclip

torch = pytest.importorskip("torch", reason="torch.nn.utils is the reference here")
fct = pytest.importorskip("fastclip.torch")


def _create_graph_grad() -> torch.nn.Parameter:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    (w**3).sum().backward(create_graph=True)  # w.grad = 3 w^2, and it requires grad
    assert w.grad.requires_grad
    return w


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_clip_grad_value_takes_gradients_that_require_grad_as_torch_does():
    ref, ours = _create_graph_grad(), _create_graph_grad()
    torch.nn.utils.clip_grad_value_([ref], 1.0)
    fct.clip_grad_value_([ours], 1.0)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=0)
    assert ours.grad.tolist() == [1.0, 1.0, 1.0]


def test_clip_grad_value_with_a_parameter_listed_twice_is_torchs_clamp():
    p, q = (torch.nn.Parameter(torch.zeros(4)) for _ in range(2))
    for a in (p, q):
        a.grad = torch.tensor([-3.0, 0.5, 2.0, -0.1])
    torch.nn.utils.clip_grad_value_([p, p], 1.0)
    fct.clip_grad_value_([q, q], 1.0)
    torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)
    shared = torch.zeros(6)
    r = torch.nn.Parameter(torch.zeros(4))
    r.grad = shared[:4]
    s = torch.nn.Parameter(torch.zeros(4))
    s.grad = shared[2:]  # different tensors sharing memory: still refused, nothing written
    shared.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0, 5.0, -5.0]))
    with pytest.raises(ValueError):
        fct.clip_grad_value_([r, s], 1.0)
    assert shared.tolist() == [5.0, -5.0, 5.0, -5.0, 5.0, -5.0]


def _f16_params(value: float = 1000.0) -> list[torch.nn.Parameter]:
    ps = [torch.nn.Parameter(torch.zeros(10_000, dtype=torch.float16)) for _ in range(2)]
    for p in ps:
        p.grad = torch.full_like(p, value)  # norm 1.41e5: beyond float16's 65504
    return ps


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_error_if_nonfinite_raises_when_the_norm_overflows_the_returned_dtype(norm_type):
    ref, ours = _f16_params(), _f16_params()
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="beyond float16's range") as info:
        fct.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True)
    assert isinstance(info.value, fastclip.NonFiniteNormError) and tuple(info.value.indices) == ()
    assert all(bool((p.grad == 1000.0).all()) for p in ours)  # nothing written
    with pytest.raises(RuntimeError):
        torch.nn.utils.get_total_norm([p.grad for p in ref], norm_type, error_if_nonfinite=True)
    with pytest.raises(fastclip.NonFiniteNormError):
        fct.get_total_norm([p.grad for p in ours], norm_type, error_if_nonfinite=True)
    # without the error both return inf in float16, as torch does; fastclip clips by the
    # exact norm (documented: torch's float16 norm is inf, so it zeroes the gradients)
    total = fct.clip_grad_norm_(ours, 1.0, norm_type)
    assert total.dtype == torch.float16 and math.isinf(float(total))
    exact = 1000.0 * (20_000 ** (1.0 / norm_type))
    want = np.float16(1000.0 * (1.0 / (exact + 1e-6)))
    assert float(ours[0].grad[0]) == pytest.approx(float(want), rel=1e-3)


def test_error_if_nonfinite_with_a_finite_float16_norm_clips_like_torch():
    ref, ours = _f16_params(0.25), _f16_params(0.25)
    a = torch.nn.utils.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
    b = fct.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    assert b.dtype == a.dtype == torch.float16
    torch.testing.assert_close(b, a, rtol=1e-3, atol=0)
    for p, q in zip(ref, ours):
        torch.testing.assert_close(q.grad, p.grad, rtol=2e-3, atol=0)


@pytest.mark.parametrize("shape", [(0,), (0, 3)])
def test_an_empty_array_with_an_infinite_bound_is_left_as_it_is(shape):
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    x = [np.zeros(shape, np.float32), np.array([3.0, 4.0], np.float32)]
    tx = optax.clip_by_block_rms(np.inf)
    want = tx.update([jnp.asarray(a) for a in x], tx.init(None))[0]
    got = fastclip.clip_by_block_rms([a.copy() for a in x], np.inf)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, np.asarray(w))
    rms = fastclip.clip_by_block_rms_([a.copy() for a in x], np.inf)
    assert float(rms[0]) == 0.0 and float(rms[1]) == pytest.approx(math.sqrt(12.5), rel=1e-6)
    assert fastclip.clip_by_average_norm(x[0], np.inf).shape == shape
    assert float(fastclip.clip_by_average_norm_(x[0].copy(), np.inf)) == 0.0


@pytest.mark.parametrize("axis", ["torch", "optax"])
def test_agc_max_norm_skips_a_zero_size_parameter_as_timm(axis):
    """timm's ``adaptive_clip_grad`` leaves a zero-size gradient as it is and clips the
    others by their own units."""
    rng = np.random.default_rng(0)
    g = [rng.normal(size=4) * 5.0, np.zeros((0, 3))]
    p = [rng.normal(size=4), np.zeros((0, 3))]
    want = []
    for gi, pi in zip(g, p):  # timm's formula (one unit per 1-D tensor), ord=inf
        if gi.size == 0:
            want.append(gi)
            continue
        mx = max(float(np.abs(pi).max()), 1e-3) * 0.01
        gn = float(np.abs(gi).max())
        want.append(gi if gn < mx else gi * (mx / max(gn, 1e-6)))
    before_max = float(np.abs(g[0]).max())  # the total max-norm before clipping
    total = fastclip.AGC(0.01, axis=axis, ord=math.inf)(g, p)
    assert float(total) == before_max
    for a, w in zip(g, want):
        np.testing.assert_allclose(a, w, rtol=1e-12)


def test_clip_by_value_of_a_list_of_jax_bfloat16_arrays_matches_optax_clip():
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    xs = [jnp.asarray([-2.0, 0.25, 3.0], dtype=jnp.bfloat16), jnp.asarray([9.0], jnp.bfloat16)]
    tx = optax.clip(1.0)
    want = tx.update(xs, tx.init(None))[0]
    got = fastclip.clip_by_value(xs, -1.0, 1.0)
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize(
    "call",
    [
        lambda x: fastclip.norm(x),
        lambda x: fastclip.clip_by_norm(x, 1.0),
        lambda x: fastclip.clip_by_value(x, -1.0, 1.0),
        lambda x: fastclip.clip_by_global_norm([x], 1.0),
    ],
)
def test_numpy_ml_dtypes_bfloat16_is_refused_with_the_fix(call):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([-2.0, 0.25, 3.0], dtype=ml_dtypes.bfloat16)
    before = x.copy()
    with pytest.raises(TypeError, match=r"NumPy arrays of ml_dtypes' bfloat16 are not supported"):
        call(x)
    np.testing.assert_array_equal(x.astype(np.float32), before.astype(np.float32))


@pytest.mark.parametrize("fn", ["get_total_norm", "clip_grad_norm_"])
def test_max_norm_with_a_zero_size_gradient_is_the_others_max(fn):
    """torch raises here (``amax`` of an empty tensor); fastclip's answer is the max over
    all elements, as the definition says (documented in README's semantics table)."""
    grads = [torch.tensor([3.0, -4.0]), torch.zeros(0)]
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        ps.append(p)
    args = ([p.grad for p in ps], math.inf) if fn == "get_total_norm" else (ps, 1.0, math.inf)
    with pytest.raises(RuntimeError):
        getattr(torch.nn.utils, fn)(*args)
    assert float(getattr(fct, fn)(*args)) == 4.0


@pytest.mark.parametrize("which", ["adamw", "sgd"])
def test_a_tensor_lr_stays_a_tensor_and_schedules_as_torchs(which):
    """torch's optimizers keep a tensor ``lr`` as a tensor in ``param_groups`` (and in the
    state dict); a scheduler then sets it, and the trajectories match torch's."""
    torch.manual_seed(0)
    ours_p = [torch.nn.Parameter(torch.randn(6))]
    ref_p = [torch.nn.Parameter(ours_p[0].detach().clone())]
    kw = {} if which == "adamw" else {"momentum": 0.9}
    ours_cls = fct.FusedAdamW if which == "adamw" else fct.FusedSGD
    ref_cls = torch.optim.AdamW if which == "adamw" else torch.optim.SGD
    ours = ours_cls(ours_p, lr=torch.tensor(1e-2), max_norm=1e9, **kw)
    ref = ref_cls(ref_p, lr=torch.tensor(1e-2), **kw)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (ours, ref)]
    for _ in range(7):
        g = torch.randn(6)
        ours_p[0].grad, ref_p[0].grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for s in scheds:
            s.step()
    lr = ours.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and isinstance(
        ours.state_dict()["param_groups"][0]["lr"], torch.Tensor
    )
    assert float(lr) == float(ref.param_groups[0]["lr"]) == pytest.approx(1e-2 / 8)
    torch.testing.assert_close(ours_p[0].detach(), ref_p[0].detach(), rtol=1e-6, atol=1e-7)


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between ``a`` and ``b`` in units of the last place of ``a``."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    ia, ib = a.view(bits).to(torch.int64), b.view(bits).to(torch.int64)
    # for values of one sign the bit patterns are ordered as the values are
    assert bool((((a < 0) == (b < 0)) | (a == 0) | (b == 0)).all())
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_half_gradients_clip_with_a_float64_coefficient_within_an_ulp_of_torch(dtype, seed):
    """Documented difference: torch rounds the total norm and the coefficient
    ``max_norm / (norm + 1e-6)`` to the gradients' 16-bit dtype before multiplying;
    fastclip forms the coefficient in float64 from the exact norm and rounds each
    product once. fastclip matches that float64 oracle bit for bit; torch's result is
    within one unit in the last place of it."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=gen).to(dtype) * 3 for n in (1000, 17, 300)]
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    fct.clip_grad_norm_(ours, 1.0)
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    exact = math.sqrt(math.fsum(float(v) ** 2 for g in grads for v in g.double().tolist()))
    coef = 1.0 / (exact + 1e-6)
    for a, b, g in zip(ours, theirs, grads):
        want = (g.double() * coef).to(dtype)
        torch.testing.assert_close(a.grad, want, rtol=0, atol=0)
        assert _ulps_apart(b.grad, want) <= 1
