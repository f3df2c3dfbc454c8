"""The fused route of SPAMAdamW and StableSPAMAdamW: which route a step takes, and the
fused steps themselves (one kernel pass per dtype through ``fastclip._dispatch``).

Routes (``fused`` argument of both optimizers, documented there):

* ``"cpu"``: CPU tensors of float16 / bfloat16 / float32 / float64, each
  gradient of its parameter's dtype: the Numba kernels of ``fastclip._cpu``;
* ``"cuda"``: CUDA tensors of those dtypes, when CuPy sees the device: the CUDA
  kernels ``fastclip_spam`` / ``fastclip_stable_spam`` (``spam_kernels.cu``);
  without CuPy (or without a device CuPy sees) such a step takes ``"foreach"``
  with ``fused=None`` and raises TypeError (naming the reason) with ``fused=True``;
* ``"foreach"``: torch's multi-tensor operations (the optimizers' own code).

State tensors and counters are the same in every route (same keys, dtypes and
values to within rounding), so a checkpoint of one route loads in another.

Stable-SPAM's per-tensor scalars (AdaClip's and AdaGN's statistics) are
computed on the host in float64 in both fused routes, from two per-tensor
reductions of the route (``spam_reduce``: max |g|, then the sum of squares
after AdaClip); on CUDA each reduction's result and the 0-d statistics are
copied to the host (three synchronisations a step, per ``amsgrad`` setting
among the groups, where the ``_foreach`` route makes none) and the new
statistics copied back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fastclip import _dispatch
from fastclip._errors import GPUUnavailableError
from fastclip._spam_hparams import spam_rows, stable_spam_rows

__all__ = ["FUSED_DTYPES", "check_fused", "choose_route", "spam_step", "stable_spam_step"]

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def check_fused(what: str, fused: Any) -> bool | None:
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"{what}: fused must be None, True or False, got {fused!r}")
    return fused


def _why_not(work: list[Any], cuda: bool) -> tuple[str | None, str]:
    """(None, device type) when every parameter can take a fused kernel, else (why not, "")."""
    device = ""
    i = -1
    for _, ps, gs in work:
        for p, g in zip(ps, gs):
            i += 1
            kind = p.device.type
            if not device:
                device = kind
            if type(p) not in _PLAIN or type(g) not in _PLAIN:
                return f"parameter {i} or its gradient is a {type(p).__name__} (a subclass)", ""
            if kind != device or g.device != p.device:
                return f"parameter {i} is on {p.device}, another parameter on {device}", ""
            if p.dtype not in FUSED_DTYPES:
                return f"parameter {i} has dtype {p.dtype}", ""
            if g.dtype != p.dtype:
                return f"parameter {i} is {p.dtype} but its gradient is {g.dtype}", ""
    if device == "cuda" and not cuda:
        return "this optimizer has no fused CUDA kernel (CUDA tensors take the foreach route)", ""
    if device not in ("cpu", "cuda"):
        return f"the parameters are on {device}", ""
    if device == "cuda":
        try:
            _dispatch.check_gpu_available()
        except GPUUnavailableError as exc:
            return str(exc), ""
    return None, device


def choose_route(what: str, work: list[Any], fused: bool | None, cuda: bool) -> str:
    """``"cpu"``, ``"cuda"`` or ``"foreach"`` for this step (see the module docstring);
    with ``fused=True`` a step no fused kernel can take raises TypeError."""
    if fused is False or not any(ps for _, ps, _ in work):
        return "foreach"
    why, device = _why_not(work, cuda)
    if why is None:
        return device
    if fused:
        raise TypeError(
            f"{what}: fused=True, but {why}. The fused kernels take CPU tensors"
            f"{' and CUDA tensors (with CuPy)' if cuda else ''} of float16, bfloat16, float32 "
            "or float64 whose gradients have their dtype; pass fused=None (fused where "
            "possible) or fused=False (torch's foreach operations)"
        )
    return "foreach"


def _zeros(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def _states(opt: Any, ps: list[torch.Tensor], make: Any) -> tuple[list[dict[str, Any]], dict]:
    """Each parameter's state, new ones kept aside (``new``) until the step is validated."""
    out, new = [], {}
    for p in ps:
        st = opt.state.get(p)
        if not st or "exp_avg" not in st:
            st = new[p] = make(p)
        out.append(st)
    return out, new


def spam_step(opt: Any, work: list[Any], scale: float, reset: bool, clips: bool) -> None:
    """One fused SPAM step over every group: one kernel pass per dtype."""
    what = f"{opt._WHAT}.step"
    ps, gs, rows_of = [], [], []
    for group, gps, ggs in work:
        ps += gps
        gs += ggs
        rows_of += [group] * len(gps)
    states, new = _states(
        opt, ps, lambda p: {"step": 0, "exp_avg": _zeros(p), "exp_avg_sq": _zeros(p)}
    )
    lists = [ps, gs, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]]
    backend = _dispatch.backend_for_step(lists, what)
    prepared = backend.spam_prepare(lists, "spam", what)  # every check before any write
    for p, st in new.items():
        opt.state[p] = st
    rows = []
    at = 0
    for group, gps, _ in work:
        k = len(gps)
        if not k:
            continue
        steps = []
        for st in states[at : at + k]:
            st["step"] += 1
            steps.append(st["step"])
        b1, b2 = group["betas"]
        rows.append(
            spam_rows(
                steps, group["lr"], b1, b2, group["eps"], group["weight_decay"],
                group["correct_bias"], scale, opt.threshold, clips, reset,
            )
        )  # fmt: skip
        at += k
    backend.spam_run(prepared, ps, np.concatenate(rows), "spam", False)


def _host(ts: list[torch.Tensor]) -> np.ndarray:
    """float64 values of 0-d tensors on one device (one stack; on CUDA one copy to
    the host, where ``float(t)`` per tensor would wait once per tensor)."""
    if len({t.dtype for t in ts}) == 1:
        return torch.stack(ts).double().cpu().numpy()
    return torch.stack([t.double() for t in ts]).cpu().numpy()


def _store(ts: list[torch.Tensor], values: np.ndarray) -> None:
    """Write float64 ``values`` into 0-d tensors on one device (rounded to each
    one's dtype; on CUDA one copy to the device first)."""
    src = torch.from_numpy(values).to(ts[0].device)
    torch._foreach_copy_(ts, list(src.unbind()))


def stable_spam_step(opt: Any, work: list[Any], scale: float, reset: bool) -> bool:
    """One fused Stable-SPAM step; False when the non-finite policy skipped it
    (decided from the same max |g| pass AdaClip reads)."""
    what = f"{opt._WHAT}.step"
    launches = []
    for ams in (False, True):
        part = [(gr, ps, gs) for gr, ps, gs in work if ps and bool(gr["amsgrad"]) == ams]
        if part:
            launches.append(_stable_prepare(opt, part, ams, what))
    finite = True
    for launch in launches:
        backend, prepared, ps = launch[:3]
        launch.append(backend.spam_reduce(prepared, len(ps), "max"))
        finite = finite and bool(np.isfinite(launch[-1]).all())
    if not finite and opt.nonfinite != "propagate":
        opt._refuse()
        return False
    for backend, prepared, ps, part, states, new, maxg in launches:
        _stable_run(opt, backend, prepared, ps, part, states, new, maxg, scale, reset)
    return True


def _stable_prepare(opt: Any, part: list[Any], ams: bool, what: str) -> list[Any]:
    ps = [p for _, gps, _ in part for p in gps]
    gs = [g for _, _, ggs in part for g in ggs]

    def make(p: torch.Tensor) -> dict[str, Any]:
        g = p.grad
        assert g is not None  # only parameters with a gradient are stepped
        st: dict[str, Any] = {"step": 0, "exp_avg": _zeros(p), "exp_avg_sq": _zeros(p)}
        for key in ("m_norm_t", "v_norm_t", "m_max_t"):
            st[key] = torch.zeros((), dtype=g.dtype, device=g.device)
        if ams:
            st["max_exp_avg_sq"] = _zeros(p)
        return st

    states, new = _states(opt, ps, make)
    xs = [st["max_exp_avg_sq"] for st in states] if ams else None
    lists = [ps, gs, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], xs]
    backend = _dispatch.backend_for_step(lists, what)
    return [backend, backend.spam_prepare(lists, "stable_spam", what), ps, part, states, new]


def _stable_run(
    opt: Any, backend: Any, prepared: Any, ps: list[Any], part: list[Any], states: list[Any],
    new: dict, maxg: np.ndarray, scale: float, reset: bool,
) -> None:  # fmt: skip
    for p, st in new.items():
        opt.state[p] = st
    for st in states:
        st["step"] += 1
    ks = np.array([st["step"] for st in states], np.float64)
    eps = np.concatenate([np.full(len(gps), float(gr["eps"])) for gr, gps, _ in part])
    theta, g1s, g2 = opt.gamma3, opt.gamma1 * scale, opt.gamma2
    n = len(ps)
    mmax_t = [st["m_max_t"] for st in states]
    mn_t = [st["m_norm_t"] for st in states]
    vn_t = [st["v_norm_t"] for st in states]
    old = _host(mmax_t + mn_t + vn_t)  # one read (on CUDA: one copy to the host)
    with np.errstate(all="ignore"):
        # AdaClip: EMA of max|g|, bias-corrected; entries above it scaled by hat / max|g|
        mmax = theta * old[:n] + (1 - theta) * maxg
        hats = mmax / (1 - theta**ks)
        shrinks = hats / maxg
        norms = np.sqrt(backend.spam_reduce(prepared, n, "clipped_sq", hats, shrinks))
        # AdaGN: EMAs of the norm and the squared norm set the gradient's new norm
        mn = g1s * old[n : 2 * n] + (1 - g1s) * norms
        vn = g2 * old[2 * n :] + (1 - g2) * norms * norms
        c = (mn / (1 - g1s**ks)) / (np.sqrt(vn / (1 - g2**ks)) + eps)
        factors = np.where(norms > 0, c / norms, 1.0)
    _store(mmax_t + mn_t + vn_t, np.concatenate([mmax, mn, vn]))
    rows, at = [], 0
    for group, gps, _ in part:
        k = len(gps)
        steps = [1 if reset else int(s) for s in ks[at : at + k]]
        b1, b2 = group["betas"]
        sl = slice(at, at + k)
        rows.append(
            stable_spam_rows(
                steps, group["lr"], b1, b2, group["eps"], group["weight_decay"], scale, reset,
                hats[sl], shrinks[sl], factors[sl],
            )
        )  # fmt: skip
        at += k
    backend.spam_run(prepared, ps, np.concatenate(rows), "stable_spam", bool(part[0][0]["amsgrad"]))
    if reset:
        for st in states:
            st["step"] = 1
