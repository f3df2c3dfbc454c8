"""The implementations compared: fastclip (CPU and GPU) and the peers.

``BACKENDS`` names each one with its role, device, timer, work-pool storage,
probe and maker; the makers live in :mod:`fastclip._bench.peers`, one module
per library.

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

from collections.abc import Callable
from dataclasses import dataclass

from .data import CaseData
from .peers import (
    Op,
    gpu_storage,
    make_cupy,
    make_fastclip,
    make_fastclip_gpu,
    make_fastclip_torch,
    make_numpy,
    make_opacus,
    make_optax,
    probe_cupy,
    probe_fastclip_gpu,
    probe_opacus,
    probe_optax,
    probe_torch,
    probe_torch_cuda,
    torch_backend,
)

__all__ = ["BACKENDS", "Backend", "Op", "device_of", "gpu_storage", "storage_of", "timer_of"]


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


# ---------------------------------------------------------------- registry


def _cuda_timer() -> str:
    return "torch-cuda" if gpu_storage() == "torch-cuda" else "cupy"


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
            make_fastclip,
        ),
        Backend(
            "fastclip-torch",
            "fastclip",
            "cpu",
            "cpu",
            "host",
            "fastclip.torch drop-ins / fastclip API on torch CPU tensors",
            probe_torch,
            make_fastclip_torch,
        ),
        Backend(
            "fastclip-gpu",
            "fastclip",
            "cuda",
            "cuda",
            "gpu",
            "fastclip on CUDA tensors (or CuPy arrays)",
            probe_fastclip_gpu,
            make_fastclip_gpu,
        ),
        Backend(
            "numpy",
            "peer",
            "cpu",
            "cpu",
            "host",
            "np.linalg.norm per array, then multiply in place",
            lambda: None,
            make_numpy,
        ),
        Backend(
            "torch-foreach",
            "peer",
            "cpu",
            "cpu",
            "host",
            "torch.nn.utils.clip_grad_norm_(foreach=True) on CPU",
            probe_torch,
            torch_backend(True, "cpu"),
        ),
        Backend(
            "torch-loop",
            "peer",
            "cpu",
            "cpu",
            "host",
            "torch.nn.utils.clip_grad_norm_(foreach=False) on CPU",
            probe_torch,
            torch_backend(False, "cpu"),
        ),
        Backend(
            "torch-fused",
            "peer",
            "cpu",
            "cpu",
            "host",
            "clip_grad_norm_ + torch.optim.AdamW(fused=True) on CPU (adamw workload only)",
            probe_torch,
            torch_backend(True, "cpu", fused=True),
        ),
        Backend(
            "torch-cuda-foreach",
            "peer",
            "cuda",
            "torch-cuda",
            "torch-cuda",
            "clip_grad_norm_(foreach=True) on CUDA",
            probe_torch_cuda,
            torch_backend(True, "cuda"),
        ),
        Backend(
            "torch-cuda-loop",
            "peer",
            "cuda",
            "torch-cuda",
            "torch-cuda",
            "clip_grad_norm_(foreach=False) on CUDA",
            probe_torch_cuda,
            torch_backend(False, "cuda"),
        ),
        Backend(
            "torch-cuda-fused",
            "peer",
            "cuda",
            "torch-cuda",
            "torch-cuda",
            "clip_grad_norm_ + AdamW(fused=True) on CUDA (adamw workload only)",
            probe_torch_cuda,
            torch_backend(True, "cuda", fused=True),
        ),
        Backend(
            "cupy",
            "peer",
            "cuda",
            "cupy",
            "cupy",
            "the NumPy recipe on CuPy arrays",
            probe_cupy,
            make_cupy,
        ),
        Backend(
            "optax",
            "peer",
            "cpu",
            "cpu",
            "own",
            "optax.clip_by_global_norm / optax.clip under jax.jit",
            probe_optax,
            make_optax,
        ),
        Backend(
            "opacus",
            "peer",
            "cpu",
            "cpu",
            "host",
            "Opacus DPOptimizer.clip_and_accumulate (per-sample workload only)",
            probe_opacus,
            make_opacus,
        ),
    ]
}


def timer_of(b: Backend) -> str:
    """How ``b``'s calls are timed: CUDA events on GPUs, perf_counter on the host
    (JAX calls block until ready inside the op)."""
    return _cuda_timer() if b.timer == "cuda" else b.timer


def storage_of(b: Backend) -> str:
    return (gpu_storage() or "none") if b.storage == "gpu" else b.storage


def device_of(b: Backend) -> str:
    """ "cpu" or "cuda" (JAX runs where its default backend is)."""
    if b.name == "optax":
        import jax

        return "cuda" if jax.default_backend() == "gpu" else "cpu"
    return b.device
