"""Where the gathered row lives: chosen from the arrays' device and the group's backend.

A collective takes tensors on the devices its backend serves: gloo (and MPI,
UCC) the CPU and CUDA, NCCL CUDA only.  Gradients offloaded to the CPU
(FSDP2 ``CPUOffloadPolicy``) on an NCCL group would fail there (pytorch
issue 148532), so the row goes through a CUDA tensor (232 bytes copied each
way); CPU gradients on a group that serves the CPU keep the row on the CPU
(no device touched).  The decision is :func:`row_device`, a pure function of
the backend's device types, unit-tested on its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["backend_device_types", "group_device_types", "row_device"]


def backend_device_types(config: str) -> frozenset[str]:
    """Device types a backend configuration serves.

    ``config`` is what ``torch.distributed.get_backend_config(group)`` says:
    one backend name (``"gloo"``, ``"nccl"``) or ``"cpu:gloo,cuda:nccl"``.

    >>> sorted(backend_device_types("nccl")), sorted(backend_device_types("cpu:gloo,cuda:nccl"))
    (['cuda'], ['cpu', 'cuda'])
    """
    capability = getattr(dist.Backend, "backend_capability", {})
    types: set[str] = set()
    for part in str(config).lower().split(","):
        part = part.strip()
        if ":" in part:
            types.add(part.split(":", 1)[0])
        elif part:
            types.update(capability.get(part, ["cpu"] if part in ("gloo", "mpi") else []))
    return frozenset(types)


def group_device_types(group: Any) -> frozenset[str]:
    """Device types the backend of ``group`` (None: the world) serves."""
    get_config = getattr(dist, "get_backend_config", None)
    config = get_config(group) if get_config is not None else dist.get_backend(group)
    return backend_device_types(str(config))


def row_device(
    arrays_device: torch.device | None, types: frozenset[str], cuda_index: int | None
) -> torch.device:
    """The device of the gathered row.

    ``arrays_device``: the arrays' device (None: no torch tensor on this rank,
    or NumPy arrays); ``types``: the backend's device types; ``cuda_index``:
    the current CUDA device, if any.  The arrays' device when the backend
    serves it; else a CUDA device (CPU arrays on NCCL); else a ValueError.

    >>> row_device(torch.device("cpu"), frozenset({"cuda"}), 0)
    device(type='cuda', index=0)
    >>> row_device(torch.device("cpu"), frozenset({"cpu", "cuda"}), 0)
    device(type='cpu')
    """
    want = arrays_device if arrays_device is not None else torch.device("cpu")
    if want.type in types:
        return want
    if "cuda" in types and cuda_index is not None:
        return torch.device("cuda", cuda_index)
    raise ValueError(
        f"fastclip.distributed: the group's backend serves {sorted(types)} tensors, the "
        f"arrays are on {want}, and no CUDA device is available to reduce through; use a "
        "group whose backend serves the arrays' device (gloo for CPU arrays)"
    )


def choose(arrays: list[Any], group: Any) -> torch.device:
    """:func:`row_device` for this rank's local arrays and ``group``."""
    device = None
    for a in arrays:
        if isinstance(a, torch.Tensor):
            device = a.device
            if device.type != "cpu":
                break  # a device tensor among CPU ones: reduce on the device
    types = group_device_types(group)
    cuda = torch.cuda.current_device() if torch.cuda.is_available() else None
    return row_device(device, types, cuda)
