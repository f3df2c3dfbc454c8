"""Contract fuzzer, stateful part: the fused steps, the clippers and fastclip.torch.

The contract of ``tests/api/test_fuzz.py`` (the float64 reference's value or
a clear ``TypeError`` / ``ValueError``, and no byte changed by a refusal),
for calls that carry state: ``fastclip.optim.adamw_step_`` over invalid
hyper-parameters and magnitudes, the adaptive clippers (a refusal keeps
their state), ``fastclip.torch.clip_grad_norm_`` / ``clip_grad_value_`` over
tensor layouts (strided, channels_last, expanded, lazily negated) and the
fused optimizers.  The stateless functions are fuzzed in ``test_fuzz.py``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import reference as ref
from _fuzz import (
    MAGNITUDE,
    REFUSALS,
    as64,
    assert_matches,
    call,
    refuse_nonfinite_only_if,
    snapshot,
    values,
)
from hypothesis import given
from hypothesis import strategies as st

import fastclip
import fastclip.optim

_HP = st.sampled_from([0.0, 1e-3, 0.1, 0.9, 1.0, -0.1, math.nan, math.inf, 10**400])


@given(
    dtype=st.sampled_from(["<f4", "<f8"]),
    lr=_HP,
    b1=_HP,
    b2=_HP,
    wd=_HP,
    max_norm=st.sampled_from([None, 1.0, 1e-30, 0.0, -1.0]),
    scale=MAGNITUDE,
    readonly=st.integers(0, 4),
    nonfinite=st.sampled_from(["propagate", "skip", "error", "bogus"]),
)
def test_adamw_step_contract(
    dtype: str,
    lr: Any,
    b1: Any,
    b2: Any,
    wd: Any,
    max_norm: Any,
    scale: float,
    readonly: int,
    nonfinite: str,
) -> None:
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(dtype) for s in (5, (2, 3))]
    with np.errstate(over="ignore"):
        grads = [(rng.standard_normal(p.shape) * scale).astype(dtype) for p in params]
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    everything = params + grads + ms + vs
    if readonly < len(everything) and readonly % 2:
        everything[readonly * 2].flags.writeable = False
    before = snapshot(everything)
    p64 = [as64(p) for p in params]
    g64 = [as64(g) for g in grads]
    total = ref.global_norm(g64)
    _, exc = call(
        refuse_nonfinite_only_if(not math.isfinite(float(total)), fastclip.optim.adamw_step_),
        params,
        grads,
        ms,
        vs,
        step=1,
        lr=lr,
        betas=(b1, b2),
        weight_decay=wd,
        max_norm=max_norm,
        nonfinite=nonfinite,
    )
    if exc is not None:
        assert snapshot(everything) == before, "a refused step changed its inputs"
        return
    coef = 1.0 if max_norm is None else float(ref.coefficient(total, max_norm, 1e-6))
    # "skip" is about the clipping norm: without max_norm no norm is taken.
    if max_norm is not None and not math.isfinite(float(total)) and nonfinite == "skip":
        assert snapshot(everything) == before
        return
    if not all(math.isfinite(float(h)) for h in (lr, b1, b2, wd)):
        # An infinite learning rate: which non-finite value (inf or NaN) an element
        # gets depends on the order of operations; that it is non-finite does not.
        with np.errstate(all="ignore"):
            want = [
                ref.adamw_step(pw, gw, 0 * pw, 0 * pw, None, 1, lr, b1, b2, 1e-8, wd, coef)[0]
                for pw, gw in zip(p64, g64)
            ]
        for p, w in zip(params, want):
            np.testing.assert_array_equal(np.isfinite(p), np.isfinite(w))
        return
    if dtype == "<f4" and max(float(np.max(np.abs(g))) for g in g64) * coef > 1e18:
        return  # AdamW's g * g overflows float32 here, in torch.optim as in fastclip
    for p, pw, gw, m, v in zip(params, p64, g64, ms, vs):
        with np.errstate(all="ignore"):  # the oracle's g * g overflows for 1e200
            want = ref.adamw_step(
                pw.copy(),
                gw,
                np.zeros_like(pw),
                np.zeros_like(pw),
                None,
                1,
                lr,
                b1,
                b2,
                1e-8,
                wd,
                coef,
            )
        # float32 moments of subnormal gradients (|g| ~ 1e-40) are rounded on the
        # subnormal grid (4 smallest subnormals at most: m = b1 * 0 + (1 - b1) * g * coef),
        # and the update divides m by (1 - b1) and by sqrt(v) + eps >= eps: the
        # parameter's error grows to lr / ((1 - b1) * eps) times that.  torch.optim's
        # float32 AdamW gives fastclip's bits there (lr=1, betas=(0.1, 0), wd=1,
        # grads of 1e-40: both -4.1161742e-33 where float64 gives -4.1163142e-33).
        p_atol = 4.0 * max(1.0, float(lr) / ((1.0 - float(b1)) * 1e-8))
        for got_, want_, atol in zip((p, m, v), want[:3], (p_atol, 4.0, 4.0)):
            assert_matches(got_, want_, np.dtype(dtype), atol_in_subnormals=atol)


@given(
    kind=st.sampled_from(["global", "autoclip", "zclip", "agc"]),
    steps=st.lists(st.integers(0, 5), min_size=1, max_size=6),
    inplace=st.booleans(),
)
def test_clipper_refusal_keeps_state(kind: str, steps: list[int], inplace: bool) -> None:
    clipper = {
        "global": lambda: fastclip.GlobalNormClipper(1.0),
        "autoclip": lambda: fastclip.AutoClip(50),
        "zclip": lambda: fastclip.ZClip(warmup_steps=2),
        "agc": lambda: fastclip.AGC(0.05),
    }[kind]()
    rng = np.random.default_rng(len(steps))
    for s in steps:
        grads = [rng.standard_normal(4).astype(np.float32), rng.standard_normal(3)]
        params = [rng.standard_normal(4).astype(np.float32), rng.standard_normal(3)]
        if s == 1:
            grads[1].flags.writeable = False
        elif s == 2:
            grads[1] = np.broadcast_to(np.float64(1.0), (3,))
        elif s == 3:
            grads[1] = grads[0][:2]  # overlaps the first gradient
        owners = grads + params
        before = snapshot(owners)
        state = copy.deepcopy(clipper.state_dict())
        _, exc = call(clipper if inplace else clipper.clip, grads, params)
        if exc is not None or not inplace:
            assert snapshot(owners) == before, f"{kind}: inputs changed"
        if exc is not None:
            assert _state_equal(clipper.state_dict(), state), f"{kind}: refused clip moved state"
        elif inplace:
            assert s not in (1, 2, 3), f"{kind}: an unwritable/overlapping gradient was clipped"


def _state_equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=True)
    return bool(a == b)


# --------------------------------------------------------------------- torch

torch = pytest.importorskip("torch")

_TORCH_DTYPES = ["float16", "bfloat16", "float32", "float64"]
_TORCH_LAYOUTS = ["c", "t", "s", "cl", "e", "neg"]


@st.composite
def tensors(draw: Any) -> tuple[Any, Any, str]:
    """A torch tensor, the tensor owning its memory, and its layout's name."""
    dtype = getattr(torch, draw(st.sampled_from(_TORCH_DTYPES)))
    layout = draw(st.sampled_from(_TORCH_LAYOUTS))
    if layout == "cl":
        shape: tuple[int, ...] = (2, 3, 2, 2)
    else:
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=2)))
    full = (2 * shape[0], *shape[1:]) if layout == "s" else shape
    with np.errstate(all="ignore"):
        owner = torch.from_numpy(draw(values(math.prod(full))).reshape(full)).to(dtype)
    x = {
        "c": lambda a: a,
        "t": lambda a: a.transpose(0, 1),
        "s": lambda a: a[::2],
        "cl": lambda a: a.contiguous(memory_format=torch.channels_last),
        "e": lambda a: a[:1].expand(a.shape),
        "neg": lambda a: a._neg_view(),
    }[layout](owner)
    if layout == "cl":
        owner = x
    if layout == "e" and x.shape[0] == 1:
        layout = "c"  # expanding one row to one row shares no element
    return x, owner, layout


def _tbytes(ts: list[Any]) -> list[bytes]:
    return [t.detach().resolve_neg().contiguous().view(torch.uint8).numpy().tobytes() for t in ts]


def _with_grads(grads: list[Any]) -> list[Any]:
    ps = [torch.zeros(g.shape, dtype=g.dtype, requires_grad=True) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps


def _t64(t: Any) -> np.ndarray:
    return t.detach().resolve_neg().double().numpy()


@given(
    tos=st.lists(tensors(), min_size=1, max_size=3),
    max_norm=st.sampled_from([0.0, 0.5, 1.0, 1e30, math.inf]),
    norm_type=st.sampled_from([1.0, 2.0, math.inf, 3.0]),
)
def test_torch_clip_grad_norm_contract(tos: Any, max_norm: float, norm_type: float) -> None:
    """torch.nn.utils.clip_grad_norm_'s formula, ``min(1, max_norm / (norm + 1e-6))``,
    against the float64 oracle: torch itself is not the oracle at the magnitudes
    drawn here (its float64 norm of 1e-200 values is 0 and of 1e200 values inf)."""
    import fastclip.torch as ft

    grads, owners, layouts = (list(z) for z in zip(*tos))
    before = _tbytes(owners)
    g64 = [_t64(g).copy() for g in grads]
    try:
        got = ft.clip_grad_norm_(_with_grads(grads), max_norm, norm_type)
    except REFUSALS:
        assert _tbytes(owners) == before, "a refused clip changed the gradients"
        return
    assert "e" not in layouts, "an expanded gradient (shared elements) was written in place"
    want, total = ref.clip_by_global_norm(g64, max_norm, norm_type, 1e-6)
    least = min(grads, key=lambda g: g.element_size()).dtype  # the norm's precision
    _assert_close_t(got, torch.from_numpy(np.asarray(total, np.float64)), least)
    for g, w in zip(grads, want):  # one coefficient: the norm's precision
        wider = least if g.element_size() > torch.tensor([], dtype=least).element_size() else None
        _assert_close_t(g, torch.from_numpy(w), wider)


def _assert_close_t(got: Any, want64: Any, precision: Any = None) -> None:
    """A torch result equals the float64 one rounded to the result's dtype, within
    the tolerance of ``precision`` (default: the result's dtype)."""
    p = got.dtype if precision is None else precision
    low = p in (torch.float16, torch.bfloat16)
    rtol = 2e-2 if low else 3e-5 if p == torch.float32 else 1e-10
    tiny = 6e-8 if low else 1.5e-45 if p == torch.float32 else 5e-324
    with np.errstate(all="ignore"):
        rounded = want64.to(got.dtype).double().numpy()
    np.testing.assert_allclose(_t64(got), rounded, rtol=rtol, atol=4 * tiny, equal_nan=True)


@given(
    tos=st.lists(tensors(), min_size=1, max_size=3),
    clip=st.sampled_from([0.0, 0.5, 1.0, 1e30, math.inf, 10**400, -1.0]),
)
def test_torch_clip_grad_value_matches_torch(tos: Any, clip: Any) -> None:
    import fastclip.torch as ft

    grads, owners, layouts = (list(z) for z in zip(*tos))
    before = _tbytes(owners)
    expected = [g.detach().resolve_neg().clone() for g in grads]
    try:
        ft.clip_grad_value_(_with_grads(grads), clip)
    except REFUSALS:
        assert _tbytes(owners) == before, "a refused clip changed the gradients"
        return
    assert "e" not in layouts, "an expanded gradient (shared elements) was written in place"
    c = float(clip)
    for g, e in zip(grads, expected):
        want = np.clip(_t64(e), -c, c)
        with np.errstate(all="ignore"):
            want = torch.from_numpy(want).to(g.dtype).double().numpy()
        np.testing.assert_array_equal(_t64(g), want)


_GROUP_KINDS = ["float32", "float64", "complex64", "expanded", "shared", "nograd"]


@st.composite
def param_groups(draw: Any) -> list[dict[str, Any]]:
    """One or two parameter groups; a group may hold a parameter no step can take."""
    groups = []
    for k in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(_GROUP_KINDS))
        gen = torch.Generator().manual_seed(k)
        dtype = getattr(torch, kind) if kind in ("float64", "complex64") else torch.float32
        p = torch.randn(3, 2, generator=gen, dtype=dtype).requires_grad_()
        g = torch.randn(3, 2, generator=gen, dtype=dtype) * draw(MAGNITUDE)
        if kind == "expanded":
            g = g[:1].expand(3, 2)
        p.grad = None if kind == "nograd" else g
        ps = [p]
        if kind == "shared":  # a second parameter viewing the first one's memory
            q = p.detach()[:2].requires_grad_()
            q.grad = torch.ones_like(q)
            ps.append(q)
        groups.append({"params": ps, "kind": kind})
    return groups


@given(
    groups=param_groups(),
    adamw=st.booleans(),
    max_norm=st.sampled_from([None, 1.0, 1e-3]),
    steps=st.integers(1, 2),
)
def test_fused_optimizer_refusal_changes_nothing(
    groups: Any, adamw: bool, max_norm: Any, steps: int
) -> None:
    """A fused step either matches torch.optim's step on clipped gradients (float64
    reference) or refuses and leaves parameters, gradients and optimizer state as
    they were; a refused step never counts."""
    import fastclip.torch as ft

    kinds = [g["kind"] for g in groups]
    cls = ft.FusedAdamW if adamw else ft.FusedSGD
    kw: dict[str, Any] = {"lr": 0.1, "max_norm": max_norm}
    if not adamw:
        kw["momentum"] = 0.9
    try:
        opt = cls([{"params": g["params"]} for g in groups], **kw)
    except REFUSALS:
        return
    params = [p for g in groups for p in g["params"]]
    complex_ = any(p.is_complex() for p in params)  # refused: no reference needed
    reference = [] if complex_ else _torch_reference_step(params, adamw, kw)
    for i in range(steps):
        before = _tbytes([p.detach() for p in params])
        grads = _tbytes([p.grad for p in params if p.grad is not None])
        state = copy.deepcopy(opt.state_dict())
        try:
            opt.step()
        except REFUSALS:
            assert _tbytes([p.detach() for p in params]) == before, "a refused step moved params"
            assert _tbytes([p.grad for p in params if p.grad is not None]) == grads
            assert _state_equal_t(opt.state_dict(), state), "a refused step changed the state"
            continue
        assert not {"complex64", "shared"} & set(kinds), f"stepped parameters {kinds}"
        if i == 0:  # a clip coefficient is as precise as the least precise gradient
            least = min((p.dtype for p in params), key=lambda d: torch.finfo(d).bits)
            for p, want in zip(params, reference):
                _assert_close_t(p.detach(), want, least if max_norm is not None else None)


def _torch_reference_step(params: list[Any], adamw: bool, kw: dict[str, Any]) -> list[Any]:
    """torch.optim's first step, in the parameters' own dtype (AdamW's ``g * g``
    overflows float32 for 1e30 gradients in torch as in fastclip), after the
    float64 oracle's clip (torch's own float64 norm of 1e200 gradients is inf,
    which zeroes them)."""
    copies = [p.detach().clone().requires_grad_() for p in params]
    for c, p in zip(copies, params):
        c.grad = None if p.grad is None else p.grad.detach().clone()
    with_grad = [c for c in copies if c.grad is not None]
    if kw["max_norm"] is not None and with_grad:
        clipped, _ = ref.clip_by_global_norm([_t64(c.grad) for c in with_grad], kw["max_norm"])
        for c, g in zip(with_grad, clipped):
            c.grad = torch.from_numpy(g).to(c.dtype)
    if adamw:
        torch.optim.AdamW(copies, lr=kw["lr"]).step()
    else:
        torch.optim.SGD(copies, lr=kw["lr"], momentum=kw["momentum"]).step()
    return [c.detach() for c in copies]


def _state_equal_t(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal_t(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal_t(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return _state_equal(a, b)
