"""The implementations compared: fastclip (CPU and GPU) and the peers.

A backend turns a :class:`~fastclip._bench.data.CaseData` into a zero-argument
callable that does one clipping call and returns what the correctness check
reads (the clipped arrays, or the norm).  In-place callables clip the shared
work pool and return its views.  ``Unsupported`` means "n/a for this case".

Peers are what people use today:

* ``numpy``         ``np.linalg.norm`` per array, the norm of the norms, then
  multiply in place (``np.clip`` / vectorised row norms for the other kinds);
* ``torch-foreach`` ``torch.nn.utils.clip_grad_norm_(..., foreach=True)``,
  ``clip_grad_value_``, ``get_total_norm`` (vectorised ops for per-row);
* ``torch-loop``    the same with ``foreach=False`` (one op per tensor);
* ``torch-cuda-*``  both on a CUDA device; ``cupy`` the NumPy recipe on CuPy;
* ``optax``         ``optax.clip_by_global_norm`` / ``optax.clip`` under
  ``jax.jit`` (in-place mode donates the input buffers).

The ``per-sample`` workload (DP-SGD: clip every sample's gradient, sum over
the batch) compares ``fastclip.clip_per_sample`` with the Opacus formula
written with torch ops (``torch-foreach``: per-layer norms, ``clamp(C / (n +
1e-6), max=1)``, ``einsum("i,i...")``), the same in NumPy, optax's
``per_example_global_norm_clip`` under ``jax.jit``, and Opacus itself
(``opacus``: ``DPOptimizer.clip_and_accumulate`` on ``p.grad_sample``).

The ``adamw`` workload (clip + one AdamW step) has its own forms: fastclip's
fused step (``fastclip.optim.adamw_step_`` on NumPy and CuPy, ``FusedAdamW`` on
torch CPU and CUDA tensors),
``clip_grad_norm_`` + ``torch.optim.AdamW`` with ``foreach=True``
(``torch-foreach``), ``foreach=False`` (``torch-loop``) or ``fused=True``
(``torch-fused``, the only kind that backend runs), the textbook NumPy loop,
and ``optax.chain(clip_by_global_norm, adamw)`` under ``jax.jit``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import ADAMW, CaseData, Unsupported

Op = Callable[[], Any]


@dataclass(frozen=True)
class Backend:
    name: str
    role: str  # "fastclip" or "peer"
    device: str  # "cpu" or "cuda"
    timer: str  # "cpu", "torch-cuda", "cupy", "cuda" = whichever GPU library
    storage: str  # work pool reset before the check: "host", "torch-cuda", "cupy",
    # "gpu" (whichever GPU library), "own" (the op copies its data)
    help: str
    probe: Callable[[], str | None]  # None = usable, else why not
    make: Callable[[CaseData, bool], Op]  # (data, inplace) -> op


# ---------------------------------------------------------------- probes


def _installed(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _probe_torch() -> str | None:
    return None if _installed("torch") else "torch is not installed"


def _probe_torch_cuda() -> str | None:
    if not _installed("torch"):
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _probe_cupy() -> str | None:
    if not _installed("cupy"):
        return "cupy is not installed"
    try:
        import cupy

        if not cupy.is_available():
            return "no CUDA device usable by CuPy (cupy.is_available() is False)"
    except Exception as exc:  # broken CUDA installs
        return f"cupy unusable: {exc}"
    return None


def _gpu_storage() -> str | None:
    if _probe_torch_cuda() is None:
        return "torch-cuda"
    if _probe_cupy() is None:
        return "cupy"
    return None


def _probe_fastclip_gpu() -> str | None:
    if _gpu_storage() is None:
        return f"no usable CUDA GPU ({_probe_torch_cuda()}; {_probe_cupy()})"
    return None


def _probe_opacus() -> str | None:
    missing = [m for m in ("torch", "opacus") if not _installed(m)]
    return f"{' and '.join(missing)} not installed" if missing else None


def _probe_optax() -> str | None:
    missing = [m for m in ("jax", "optax") if not _installed(m)]
    return f"{' and '.join(missing)} not installed" if missing else None


# ---------------------------------------------------------------- fastclip


def _fastclip_ops(
    arrays: list[Any],
    d: CaseData,
    inplace: bool,
    drop_in: Any = None,
    params: list[Any] | None = None,
) -> Op:
    """fastclip's public API on ``arrays`` (NumPy, torch, CuPy); ``drop_in`` is
    ``fastclip.torch``, used where the torch peers use ``torch.nn.utils``."""
    import fastclip as fc

    kind = d.case.kind
    x = arrays[0]
    if kind == "persample":
        c = d.max_norm
        return lambda: fc.clip_per_sample(arrays, c).grads
    if kind == "clip":
        c = d.max_norm
        if inplace and drop_in is not None and params is not None:
            return lambda: (drop_in.clip_grad_norm_(params, c), arrays)[1]
        if len(arrays) == 1:
            if inplace:
                return lambda: (fc.clip_by_norm_(x, c), arrays)[1]
            return lambda: [fc.clip_by_norm(x, c)]
        if inplace:
            return lambda: (fc.clip_by_global_norm_(arrays, c), arrays)[1]
        return lambda: fc.clip_by_global_norm(arrays, c)[0]
    if kind == "rows":
        c = d.max_norm
        if inplace:
            return lambda: (fc.clip_by_norm_(x, c, axis=1), arrays)[1]
        return lambda: [fc.clip_by_norm(x, c, axis=1)]
    if kind == "value":
        v = d.clip_value
        if inplace and drop_in is not None and params is not None:
            return lambda: (drop_in.clip_grad_value_(params, v), arrays)[1]
        if inplace:
            return lambda: (fc.clip_by_value_(x, -v, v), arrays)[1]
        return lambda: [fc.clip_by_value(x, -v, v)]
    if drop_in is not None:
        return lambda: drop_in.get_total_norm(arrays)
    if len(arrays) == 1:
        return lambda: fc.norm(x)
    return lambda: fc.global_norm(arrays)


def _make_fastclip(d: CaseData, inplace: bool) -> Op:
    if d.case.kind == "adamw":
        return _fastclip_adamw(d, d.numpy_arrays(), d.param_copies("numpy"))
    return _fastclip_ops(d.numpy_arrays(), d, inplace)


def _make_fastclip_torch(d: CaseData, inplace: bool) -> Op:
    import fastclip.torch as fct

    if d.case.kind == "adamw":
        params = d.param_copies("torch")
        opt = fct.FusedAdamW(params, **ADAMW, max_norm=d.max_norm)
        return lambda: (opt.step(), _params_and_moments(params, opt))[1]
    if d.case.kind == "persample":
        return _fastclip_ops(d.torch_tensors("cpu"), d, inplace)
    params = d.torch_params("cpu")
    return _fastclip_ops([p.grad for p in params], d, inplace, fct, params)


def _fastclip_adamw(d: CaseData, grads: list[Any], params: list[Any]) -> Op:
    """fastclip's fused clip + AdamW step through the functional API (NumPy or CuPy)."""
    from fastclip.optim import adamw_step_

    m = [p * 0 for p in params]
    v = [p * 0 for p in params]
    step = [0]

    def op() -> list[Any]:
        step[0] += 1
        adamw_step_(params, grads, m, v, step=step[0], **ADAMW, max_norm=d.max_norm)
        return params + m

    return op


def _params_and_moments(params: list[Any], opt: Any) -> list[Any]:
    """What the ``adamw`` check reads: the parameters, then their first moments."""
    return list(params) + [opt.state[p]["exp_avg"] for p in params]


def _make_fastclip_gpu(d: CaseData, inplace: bool) -> Op:
    if d.case.kind == "adamw":
        if _gpu_storage() == "torch-cuda":
            import fastclip.torch as fct

            params = d.param_copies("torch", "cuda")
            opt = fct.FusedAdamW(params, **ADAMW, max_norm=d.max_norm)
            return lambda: (opt.step(), _params_and_moments(params, opt))[1]
        return _fastclip_adamw(d, d.cupy_arrays(), d.param_copies("cupy"))
    if _gpu_storage() == "torch-cuda":
        arrays = d.torch_tensors("cuda")
    else:
        arrays = d.cupy_arrays()
    return _fastclip_ops(arrays, d, inplace)


# ---------------------------------------------------------------- numpy / cupy naive


def _naive_ops(xp: Any, arrays: list[Any], d: CaseData, inplace: bool) -> Op:
    """The textbook recipe: per-array norm, norm of norms, multiply."""
    kind = d.case.kind
    x = arrays[0]
    dt = x.dtype.type if xp is np else x.dtype
    if kind == "persample":  # the Opacus formula, array by array
        c = d.max_norm

        def persample() -> list[Any]:
            flat = [a.reshape(a.shape[0], -1) for a in arrays]
            norms = xp.sqrt(sum(xp.linalg.norm(g, axis=1) ** 2 for g in flat))
            f = xp.minimum(1.0, c / (norms + 1e-6)).astype(x.dtype)
            return [xp.tensordot(f, a, axes=1) for a in arrays]

        return persample
    if kind in ("clip", "norm"):
        c = d.max_norm if kind == "clip" else 0.0

        def total() -> Any:
            if len(arrays) == 1:
                return xp.linalg.norm(x)
            return xp.linalg.norm(xp.asarray([xp.linalg.norm(a) for a in arrays]))

        if kind == "norm":
            return total

        def clip() -> list[Any]:
            coef = xp.minimum(1.0, c / (total() + 1e-6))
            coef = dt(coef) if xp is np else coef.astype(dt)
            if inplace:
                for a in arrays:
                    a *= coef
                return arrays
            return [a * coef for a in arrays]

        return clip
    if kind == "rows":
        c = d.max_norm

        def rows() -> list[Any]:
            f = xp.minimum(1.0, c / (xp.linalg.norm(x, axis=1, keepdims=True) + 1e-6))
            f = f.astype(x.dtype)
            if inplace:
                xp.multiply(x, f, out=x)
                return arrays
            return [x * f]

        return rows
    v = d.clip_value
    if inplace:
        return lambda: (xp.clip(x, -v, v, out=x), arrays)[1]
    return lambda: [xp.clip(x, -v, v)]


def _naive_adamw(xp: Any, grads: list[Any], params: list[Any], d: CaseData) -> Op:
    """The textbook clip + AdamW step, one array operation at a time."""
    lr, (b1, b2), eps, wd = (ADAMW[k] for k in ("lr", "betas", "eps", "weight_decay"))
    m = [xp.zeros_like(p) for p in params]
    v = [xp.zeros_like(p) for p in params]
    step = [0]
    c = d.max_norm

    def op() -> list[Any]:
        step[0] += 1
        total = xp.linalg.norm(xp.asarray([xp.linalg.norm(g) for g in grads]))
        coef = xp.minimum(1.0, c / (total + 1e-6))
        bc1 = 1 - b1 ** step[0]
        bc2 = (1 - b2 ** step[0]) ** 0.5
        for p, g, mk, vk in zip(params, grads, m, v):
            gc = g * coef.astype(g.dtype) if xp is not np else g * g.dtype.type(coef)
            p *= 1 - lr * wd
            mk *= b1
            mk += (1 - b1) * gc
            vk *= b2
            vk += (1 - b2) * gc * gc
            p -= (lr / bc1) * mk / (xp.sqrt(vk) / bc2 + eps)
        return params + m

    return op


def _make_numpy(d: CaseData, inplace: bool) -> Op:
    if d.case.kind == "adamw":
        return _naive_adamw(np, d.numpy_arrays(), d.param_copies("numpy"), d)
    return _naive_ops(np, d.numpy_arrays(), d, inplace)


def _make_cupy(d: CaseData, inplace: bool) -> Op:
    import cupy

    if d.case.kind == "adamw":
        return _naive_adamw(cupy, d.cupy_arrays(), d.param_copies("cupy"), d)
    return _naive_ops(cupy, d.cupy_arrays(), d, inplace)


# ---------------------------------------------------------------- torch


def _torch_adamw(d: CaseData, foreach: bool, fused: bool, device: str) -> Op:
    """``clip_grad_norm_`` + ``torch.optim.AdamW`` (foreach, loop or fused)."""
    import torch

    params = d.param_copies("torch", device)
    if fused:
        opt = torch.optim.AdamW(params, **ADAMW, fused=True)
    else:
        opt = torch.optim.AdamW(params, **ADAMW, foreach=foreach)
    c = d.max_norm

    def op() -> list[Any]:
        torch.nn.utils.clip_grad_norm_(params, c, foreach=foreach)
        opt.step()
        return _params_and_moments(params, opt)

    if fused:  # the CPU fused kernels need a recent torch and CPU support
        try:
            probe = torch.nn.Parameter(torch.zeros(4, device=device))
            probe.grad = torch.zeros(4, device=device)
            torch.optim.AdamW([probe], fused=True).step()
        except (RuntimeError, ValueError) as exc:
            raise Unsupported(f"torch AdamW(fused=True) is not available here: {exc}") from exc
    return op


def _torch_ops(d: CaseData, inplace: bool, foreach: bool, device: str, fused: bool = False) -> Op:
    import torch

    if d.case.kind == "adamw":
        return _torch_adamw(d, foreach, fused, device)
    if fused:
        raise Unsupported("fused=True is a torch.optim option: the adamw workload only")
    if d.case.kind == "persample":
        if not foreach:
            raise Unsupported("the Opacus formula has one torch form (torch-foreach)")
        return _opacus_formula(d.torch_tensors(device), d.max_norm)
    utils = torch.nn.utils
    params = d.torch_params(device)
    grads = [p.grad for p in params]
    kind = d.case.kind
    if kind == "clip":
        c = d.max_norm
        if inplace:
            return lambda: (utils.clip_grad_norm_(params, c, foreach=foreach), grads)[1]

        def clip() -> list[Any]:
            total = utils.get_total_norm(grads, foreach=foreach)
            coef = torch.clamp(c / (total + 1e-6), max=1.0)
            if foreach:
                return list(torch._foreach_mul(grads, coef))
            return [g * coef for g in grads]

        return clip
    if kind == "rows":
        if not foreach:
            raise Unsupported("per-row clipping has one torch form: vectorised (torch-foreach)")
        c = d.max_norm
        x = grads[0]

        def rows() -> list[Any]:
            f = (c / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-6)).clamp_(max=1.0)
            if inplace:
                x.mul_(f)
                return grads
            return [x * f]

        return rows
    if kind == "value":
        v = d.clip_value
        if inplace:
            return lambda: (utils.clip_grad_value_(params, v, foreach=foreach), grads)[1]
        if foreach:
            return lambda: list(torch._foreach_clamp_max(torch._foreach_clamp_min(grads, -v), v))
        return lambda: [torch.clamp(g, -v, v) for g in grads]
    return lambda: utils.get_total_norm(grads, foreach=foreach)


def _opacus_formula(grads: list[Any], max_norm: float) -> Op:
    """Opacus' flat clipping written with torch ops (``DPOptimizer.clip_and_accumulate``)."""
    import torch

    def op() -> list[Any]:
        per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grads]
        norms = torch.stack(per_param, dim=1).norm(2, dim=1)
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        return [torch.einsum("i,i...", factor, g) for g in grads]

    return op


def _make_opacus(d: CaseData, inplace: bool) -> Op:
    """Opacus itself: ``DPOptimizer.clip_and_accumulate`` (no noise) on ``p.grad_sample``."""
    if d.case.kind != "persample":
        raise Unsupported("Opacus clips per-sample gradients: the per-sample workload only")
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from opacus.optimizers import DPOptimizer

    grads = d.torch_tensors("cpu")
    params: list[Any] = []  # Opacus adds grad_sample / summed_grad attributes
    for g in grads:
        p: Any = torch.nn.Parameter(torch.zeros(g.shape[1:], dtype=g.dtype))
        p.grad_sample = g
        params.append(p)
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=d.max_norm,
        expected_batch_size=grads[0].shape[0],
    )

    def op() -> list[Any]:
        for p in params:  # what zero_grad + a new backward would give: fresh per-sample grads
            p.summed_grad = None  # clip_and_accumulate adds to it
            if hasattr(p.grad_sample, "_processed"):
                del p.grad_sample._processed  # Opacus' "used in a step" mark
        opt.clip_and_accumulate()
        return [p.summed_grad for p in params]

    return op


def _torch_backend(
    foreach: bool, device: str, fused: bool = False
) -> Callable[[CaseData, bool], Op]:
    return lambda d, inplace: _torch_ops(d, inplace, foreach, device, fused)


# ---------------------------------------------------------------- optax / JAX


def _make_optax(d: CaseData, inplace: bool) -> Op:
    import jax
    import jax.numpy as jnp
    import optax

    kind = d.case.kind
    if kind == "rows":
        raise Unsupported("optax has no per-row clip that keeps the rows")
    if kind == "adamw":
        return _optax_adamw(d)
    if kind == "persample":
        if d.dtype == "float64" and not jax.config.read("jax_enable_x64"):
            raise Unsupported("JAX computes in float32 unless jax_enable_x64 is set")
        g = _jax_arrays(d)
        clip = jax.jit(lambda gs: optax.per_example_global_norm_clip(gs, d.max_norm)[0])
        return lambda: jax.block_until_ready(clip(g))
    dtype = jnp.bfloat16 if d.dtype == "bfloat16" else d.dtype
    grads = [a.astype(dtype) for a in _jax_arrays(d)]
    if kind == "norm":
        f = jax.jit(optax.global_norm)
        return lambda: f(grads).block_until_ready()
    tx = optax.clip_by_global_norm(d.max_norm) if kind == "clip" else optax.clip(d.clip_value)
    state = tx.init(grads)

    def update(g: Any) -> Any:
        return tx.update(g, state)[0]

    if not inplace:
        f = jax.jit(update)
        return lambda: jax.block_until_ready(f(grads))
    fd = jax.jit(update, donate_argnums=0)  # the input buffers are reused: "in place"
    box = [grads]

    def donated() -> Any:
        box[0] = jax.block_until_ready(fd(box[0]))
        return box[0]

    return donated


def _jax_arrays(d: CaseData) -> list[Any]:
    """The case's base values as JAX arrays (copies: JAX owns its buffers)."""
    import jax.numpy as jnp

    return [jnp.asarray(v) for v in d.views_of(d.ref_pool)]


def _optax_adamw(d: CaseData) -> Op:
    """``optax.chain(clip_by_global_norm, adamw)`` under ``jax.jit``, buffers donated."""
    import jax
    import jax.numpy as jnp
    import optax

    if d.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise Unsupported("JAX computes in float32 unless jax_enable_x64 is set")
    (b1, b2) = ADAMW["betas"]
    tx = optax.chain(
        optax.clip_by_global_norm(d.max_norm),
        optax.adamw(
            ADAMW["lr"], b1=b1, b2=b2, eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"]
        ),
    )
    grads = _jax_arrays(d)
    params = [jnp.asarray(p) for p in d.param_copies("numpy")]

    def update(params: Any, state: Any, grads: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    f = jax.jit(update, donate_argnums=(0, 1))
    box = [params, tx.init(params)]

    def op() -> list[Any]:
        box[0], box[1] = jax.block_until_ready(f(box[0], box[1], grads))
        return list(box[0]) + list(box[1][1][0].mu)  # (clip, (scale_by_adam, ...))

    return op


# ---------------------------------------------------------------- registry


def _cuda_timer() -> str:
    return "torch-cuda" if _gpu_storage() == "torch-cuda" else "cupy"


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in [
        Backend(
            "fastclip",
            "fastclip",
            "cpu",
            "cpu",
            "host",
            "fastclip on NumPy arrays (Numba CPU kernels)",
            lambda: None,
            _make_fastclip,
        ),
        Backend(
            "fastclip-torch",
            "fastclip",
            "cpu",
            "cpu",
            "host",
            "fastclip.torch drop-ins / fastclip API on torch CPU tensors",
            _probe_torch,
            _make_fastclip_torch,
        ),
        Backend(
            "fastclip-gpu",
            "fastclip",
            "cuda",
            "cuda",
            "gpu",
            "fastclip on CUDA tensors (or CuPy arrays)",
            _probe_fastclip_gpu,
            _make_fastclip_gpu,
        ),
        Backend(
            "numpy",
            "peer",
            "cpu",
            "cpu",
            "host",
            "np.linalg.norm per array, then multiply in place",
            lambda: None,
            _make_numpy,
        ),
        Backend(
            "torch-foreach",
            "peer",
            "cpu",
            "cpu",
            "host",
            "torch.nn.utils.clip_grad_norm_(foreach=True) on CPU",
            _probe_torch,
            _torch_backend(True, "cpu"),
        ),
        Backend(
            "torch-loop",
            "peer",
            "cpu",
            "cpu",
            "host",
            "torch.nn.utils.clip_grad_norm_(foreach=False) on CPU",
            _probe_torch,
            _torch_backend(False, "cpu"),
        ),
        Backend(
            "torch-fused",
            "peer",
            "cpu",
            "cpu",
            "host",
            "clip_grad_norm_ + torch.optim.AdamW(fused=True) on CPU (adamw workload only)",
            _probe_torch,
            _torch_backend(True, "cpu", fused=True),
        ),
        Backend(
            "torch-cuda-foreach",
            "peer",
            "cuda",
            "torch-cuda",
            "torch-cuda",
            "clip_grad_norm_(foreach=True) on CUDA",
            _probe_torch_cuda,
            _torch_backend(True, "cuda"),
        ),
        Backend(
            "torch-cuda-loop",
            "peer",
            "cuda",
            "torch-cuda",
            "torch-cuda",
            "clip_grad_norm_(foreach=False) on CUDA",
            _probe_torch_cuda,
            _torch_backend(False, "cuda"),
        ),
        Backend(
            "torch-cuda-fused",
            "peer",
            "cuda",
            "torch-cuda",
            "torch-cuda",
            "clip_grad_norm_ + AdamW(fused=True) on CUDA (adamw workload only)",
            _probe_torch_cuda,
            _torch_backend(True, "cuda", fused=True),
        ),
        Backend(
            "cupy",
            "peer",
            "cuda",
            "cupy",
            "cupy",
            "the NumPy recipe on CuPy arrays",
            _probe_cupy,
            _make_cupy,
        ),
        Backend(
            "optax",
            "peer",
            "cpu",
            "cpu",
            "own",
            "optax.clip_by_global_norm / optax.clip under jax.jit",
            _probe_optax,
            _make_optax,
        ),
        Backend(
            "opacus",
            "peer",
            "cpu",
            "cpu",
            "host",
            "Opacus DPOptimizer.clip_and_accumulate (per-sample workload only)",
            _probe_opacus,
            _make_opacus,
        ),
    ]
}


def timer_of(b: Backend) -> str:
    """How ``b``'s calls are timed: CUDA events on GPUs, perf_counter on the host
    (JAX calls block until ready inside the op)."""
    return _cuda_timer() if b.timer == "cuda" else b.timer


def storage_of(b: Backend) -> str:
    return (_gpu_storage() or "none") if b.storage == "gpu" else b.storage


def device_of(b: Backend) -> str:
    """ "cpu" or "cuda" (JAX runs where its default backend is)."""
    if b.name == "optax":
        import jax

        return "cuda" if jax.default_backend() == "gpu" else "cpu"
    return b.device
