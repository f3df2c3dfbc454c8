"""This rank's share of the norm, every element accumulated in float64.

fastclip's CPU and GPU kernels sum float32 and 16-bit elements in float32
(blocks on the CPU, threads on the GPU; then float64): fast, but which
elements share a block depends on how the model is split, so the float32
rounding inside the blocks does too, and the norm of one model split 2 ways
differed from the norm split 4 ways by more than float32's rounding
(``test_norm_does_not_depend_on_the_split`` in
tests/integration/test_distributed_layouts.py; torchtitan PR 4135 for bf16).
Here every element is widened to float64 before it is summed, so the float64
total is the same for every split up to float64 rounding and its float32
result is the float64 value rounded once:

* NumPy arrays and CPU tensors: the CPU route's float64-accumulating kernels
  (``fastclip/_cpu/_wide_kernels.py``), one launch per dtype, no copies; a
  Python float;
* CUDA tensors and CuPy arrays: the GPU route's float64-accumulating CUDA
  kernels (``fastclip/_gpu/_wide.py``), one launch per dtype (three where a
  float64 power sum may need rescaling: p other than 1, 2, inf, and L2 with
  float64 data), no copies; a float64 0-d CUDA tensor, never read to the host
  (a CuPy result is handed to torch through DLPack; read on the host only
  where torch has no CUDA).  Like every fastclip call on device arrays this
  needs the GPU route (CuPy with a CUDA device): without it
  ``GPUUnavailableError`` is raised, as a refusal like any other (see
  :mod:`fastclip.distributed`), and nothing is copied to the host;
* tensors the kernels do not take -- complex CUDA tensors, and tensors on
  devices without a fastclip route (mps, xpu, ...: the generic route) --:
  chunks of ``_CHUNK`` elements are copied into a float64 (complex128)
  buffer on the device, then ``torch.dot`` (``_widened_norm``); float64
  tensors there, and other libraries' arrays, take their route's own norm.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from fastclip import _api, _dispatch

__all__ = ["by_device", "combine", "local_norm"]

_CHUNK = 1 << 18  # elements widened at a time: a 2 MB float64 buffer
_WIDE = ("float64", "complex128")


def by_device(arrays: list[Any]) -> list[list[Any]]:
    """The arrays split by library and device, in order of first appearance."""
    parts: dict[Any, list[Any]] = {}
    for a in arrays:
        where = (type(a), str(a.device)) if isinstance(a, torch.Tensor) else (type(a), "cpu")
        parts.setdefault(where, []).append(a)
    return list(parts.values())


def combine(norms: torch.Tensor, ord_code: int, p: float) -> torch.Tensor:
    """The norm of a vector of norms, scaled by the largest (no over- or underflow);
    NaN and inf propagate."""
    m = norms.amax()  # torch's amax propagates NaN
    if ord_code == 0:
        return m
    ok = torch.isfinite(m) & (m > 0)
    scale = torch.where(ok, m, torch.ones_like(m))
    s = torch.sum(torch.pow(norms / scale, p))
    total = scale * (
        torch.sqrt(s) if ord_code == 2 else s if ord_code == 1 else torch.pow(s, 1.0 / p)
    )
    return torch.where(ok, total, m)  # 0, inf or NaN: the max says it all


def _power_sum(b: torch.Tensor, ord_code: int, p: float, scale: float) -> torch.Tensor:
    """Sum of |b / scale|^p of one widened chunk (float64 or complex128), in float64."""
    if ord_code == 2:
        return torch.vdot(b, b).real if b.is_complex() else torch.dot(b, b)
    a = b.abs() if b.is_complex() else b.abs_()
    if ord_code == 1:
        return a.sum()
    return a.div_(scale).pow_(p).sum()


def _abs_max(flat: torch.Tensor) -> torch.Tensor:
    """max |x| as a float64 0-d tensor (exact in any dtype; NaN propagates).  From max
    and min: torch's ``vector_norm(x, inf)`` took 25x longer than they on the CPU."""
    if flat.is_complex():
        return flat.abs().amax().to(torch.float64)
    return torch.maximum(flat.max(), -flat.min()).to(torch.float64)


def _widened_norm(a: Any, ord_code: int, p: float) -> Any:
    """One array's norm, every element widened to float64 before it is summed: a float64
    0-d tensor on the array's device.

    The chunks are copied into one reused float64 buffer of ``_CHUNK`` elements
    (2 MB: cache-resident, no allocation per chunk).  Squares of widened float32
    or 16-bit values (|x| < 3.5e38) cannot overflow float64; other powers are
    taken of x / max|x|, which cannot either.
    """
    if isinstance(a, np.ndarray):
        with warnings.catch_warnings():  # a read-only array: only read here
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
    else:
        t = a.detach()
    flat = t.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float64, device=flat.device)
    scale = 1.0
    if ord_code not in (1, 2):
        amax = _abs_max(flat)
        if ord_code == 0:
            return amax
        m = float(amax)  # a host read (on a GPU) for p other than 1, 2 and inf only
        if not math.isfinite(m) or m == 0.0:
            return amax  # 0, inf or NaN: the max says it all
        scale = m
    wide = torch.complex128 if flat.is_complex() else torch.float64
    buf = torch.empty(min(n, _CHUNK), dtype=wide, device=flat.device)
    # 16-bit floats widen through float32 (exact both ways): torch's direct bfloat16 ->
    # float64 copy took 100x longer on the CPU than the two vectorised copies.
    mid = None
    if flat.dtype in (torch.bfloat16, torch.float16):
        mid = torch.empty(min(n, _CHUNK), dtype=torch.float32, device=flat.device)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for i in range(0, n, _CHUNK):
        chunk = flat[i : i + _CHUNK]
        b = buf[: chunk.numel()]
        if mid is not None:
            chunk = mid[: chunk.numel()].copy_(chunk)
        b.copy_(chunk)
        total += _power_sum(b, ord_code, p, scale)
    root = total.sqrt() if ord_code == 2 else total if ord_code == 1 else total.pow(1.0 / p)
    return root * scale


def _as_torch(value: Any) -> Any:
    """A GPU-route norm as a torch tensor on its device: zero-copy through DLPack for a
    CuPy 0-d array (torch waits on CuPy's stream, the host does not); a float where
    torch has no CUDA."""
    if isinstance(value, torch.Tensor):
        return value
    if torch.cuda.is_available():
        return torch.from_dlpack(value)
    return float(value)  # a host read: torch cannot hold the device value


def _one_norm(arrays: list[Any], ord_code: int, p: float, packed: Any = None) -> Any:
    """The norm of arrays of one library and device: a float, or a float64 device tensor."""
    backend = _dispatch.backend_for(arrays)
    if backend.route == _dispatch.ROUTE_CPU:
        # NumPy, CPU tensors: one launch per dtype of the CPU route's float64-accumulating
        # kernels, no copies.
        return float(backend.norm64(arrays, ord_code, p, packed, wide=True))
    values: list[Any] = []
    if backend.route == _dispatch.ROUTE_GPU:
        # CUDA tensors, CuPy arrays: the GPU route's float64-accumulating kernels (one
        # launch per dtype, the norm stays on the device); complex tensors, which they do
        # not take, are widened chunk by chunk.
        cplx = [a for a in arrays if isinstance(a, torch.Tensor) and a.is_complex()]
        real = [a for a in arrays if not (isinstance(a, torch.Tensor) and a.is_complex())]
        if real:
            checked = packed if len(real) == len(arrays) else None
            values.append(_as_torch(backend.norm64(real, ord_code, p, checked, wide=True)))
        values += [_widened_norm(a, ord_code, p) for a in cplx]
        arrays = []
    narrow = [a for a in arrays if str(a.dtype).rsplit(".", 1)[-1] not in _WIDE]
    if arrays and isinstance(arrays[0], torch.Tensor) and narrow:
        values = [_widened_norm(a, ord_code, p) for a in narrow]
        arrays = [a for a in arrays if str(a.dtype).rsplit(".", 1)[-1] in _WIDE]
    if arrays:  # float64 tensors on the generic route, other libraries: the route's own norm
        value = _api.global_norm(arrays, math.inf if ord_code == 0 else p)
        if not isinstance(value, torch.Tensor):
            return float(value)  # another library: read on the host
        values.append(value.detach().to(torch.float64))
    if len(values) == 1:
        v = values[0]
        return float(v) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    out = combine(stacked, ord_code, p)
    return float(out) if out.device.type == "cpu" else out


def local_norm(counted: list[Any], ord_code: int, p: float, packed: Any = None) -> Any:
    """This rank's norm as a float (CPU) or a float64 0-d device tensor (GPU).

    ``packed``: the CPU tables of exactly ``counted``, already built and checked.
    Arrays on several devices: one norm per device, combined in float64.
    """
    if not counted:
        return 0.0
    parts = by_device(counted)
    if len(parts) == 1:
        return _one_norm(counted, ord_code, p, packed)
    norms = [_one_norm(part, ord_code, p) for part in parts]
    device = next((n.device for n in norms if isinstance(n, torch.Tensor)), None)
    stacked = torch.stack([torch.as_tensor(n, dtype=torch.float64, device=device) for n in norms])
    return combine(stacked, ord_code, p)
