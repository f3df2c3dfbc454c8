"""Host-side planning for the GPU kernels: chunk tables and launch sizes.

Pure NumPy, no CuPy: unit-tested on every machine against plain-Python
expectations (``tests/gpu/test_gpu_plan.py``).
"""

from __future__ import annotations

import numpy as np


def chunk_table(sizes: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(tensor index, first element) of every chunk of every tensor, in order.

    A tensor of n elements has ceil(n / chunk) chunks; empty tensors have none.
    """
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    sizes = np.asarray(sizes, np.int64)
    counts = (sizes + chunk - 1) // chunk
    tensor = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
    first = np.cumsum(counts) - counts  # index of each tensor's first chunk
    start = (np.arange(tensor.size, dtype=np.int64) - np.repeat(first, counts)) * chunk
    return tensor, start


def grid_size(work_items: int, max_blocks: int) -> int:
    """Blocks for a grid-stride launch over ``work_items`` (at least 1)."""
    return int(max(1, min(work_items, max_blocks)))


def elementwise_grid(n: int, block: int, max_blocks: int) -> int:
    """Blocks for a grid-stride elementwise launch over n elements."""
    return grid_size((n + block - 1) // block, max_blocks)


def pack_table(ptrs: list[int], sizes: list[int], chunk: int) -> tuple[np.ndarray, int, int]:
    """One int64 buffer [ptrs | sizes | chunk_tensor | chunk_start] (one H2D copy).

    Returns (buffer, number of tensors, number of chunks).  Pointers are stored
    as int64 bit patterns of the unsigned addresses.
    """
    n = len(ptrs)
    size_arr = np.asarray(sizes, np.int64)
    tensor, start = chunk_table(size_arr, chunk)
    buf = np.empty(2 * n + 2 * tensor.size, np.int64)
    buf[:n] = np.asarray(ptrs, np.uint64).view(np.int64)
    buf[n : 2 * n] = size_arr
    buf[2 * n : 2 * n + tensor.size] = tensor
    buf[2 * n + tensor.size :] = start
    return buf, n, int(tensor.size)
