"""Host-side planning of the GPU kernels, checked against plain-Python expectations.

This file owns the GPU kernels' host-side launch planning; the drivers themselves run
emulated in tests/gpu/emulated/.

Runs on every machine (no CuPy, no GPU needed).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastclip._gpu import _tables


def _expected_chunks(sizes: list[int], chunk: int) -> list[tuple[int, int]]:
    out = []
    for t, n in enumerate(sizes):
        start = 0
        while start < n:
            out.append((t, start))
            start += chunk
    return out


@given(sizes=st.lists(st.integers(0, 300), max_size=30), chunk=st.integers(1, 64))
def test_chunk_table_matches_a_plain_loop(sizes, chunk):
    tensor, start = _tables.chunk_table(np.array(sizes, np.int64), chunk)
    assert list(zip(tensor.tolist(), start.tolist(), strict=True)) == _expected_chunks(sizes, chunk)


def test_chunk_table_past_two_to_the_31():
    n = 2**31 + 5
    tensor, start = _tables.chunk_table(np.array([3, n]), 2**30)
    assert tensor.tolist() == [0, 1, 1, 1]
    assert start.tolist() == [0, 0, 2**30, 2**31]
    assert start.dtype == np.int64


def test_chunk_table_rejects_bad_chunk():
    with pytest.raises(ValueError):
        _tables.chunk_table(np.array([4]), 0)


def test_pack_table_layout():
    ptrs = [2**63 + 16, 4096, 8192]  # an address above 2**63 keeps its bits
    buf, n, nc = _tables.pack_table(ptrs, [5, 0, 9], 4)
    assert (n, nc) == (3, 2 + 3)
    assert buf.dtype == np.int64
    assert buf[:3].view(np.uint64).tolist() == ptrs
    assert buf[3:6].tolist() == [5, 0, 9]
    assert buf[6:11].tolist() == [0, 0, 2, 2, 2]  # chunk -> tensor
    assert buf[11:16].tolist() == [0, 4, 0, 4, 8]  # chunk -> first element


@pytest.mark.parametrize(
    ("work", "max_blocks", "expected"), [(0, 10, 1), (1, 10, 1), (7, 10, 7), (70, 10, 10)]
)
def test_grid_size(work, max_blocks, expected):
    assert _tables.grid_size(work, max_blocks) == expected


@pytest.mark.parametrize(
    ("n", "block", "expected"), [(0, 256, 1), (1, 256, 1), (256, 256, 1), (257, 256, 2)]
)
def test_elementwise_grid(n, block, expected):
    assert _tables.elementwise_grid(n, block, 1_000) == expected
    assert _tables.elementwise_grid(10**12, block, 1_000) == 1_000
