"""Batch slices that keep a fused kernel's launch grid inside CUDA's limit (pure Python, no triton)."""

from __future__ import annotations

import pytest

from surgery.ops.launch_limits import GRID_Y_MAX, batch_slices


def test_the_batch_that_failed_is_split_inside_the_limit() -> None:
    parts = batch_slices(8192, 9)  # batch 8192 x 9 heads = 73,728 programs failed on the H200
    assert len(parts) == 2
    assert all((p.stop - p.start) * 9 <= GRID_Y_MAX for p in parts)
    assert [i for p in parts for i in range(p.start, p.stop)] == list(range(8192))


@pytest.mark.parametrize(("batch", "per_row", "limit", "sizes"), [
    (4, 9, GRID_Y_MAX, [4]),
    (5, 4, 8, [2, 2, 1]),
    (6, 3, 9, [3, 3]),
    (1, 7, 7, [1]),
])
def test_slices_cover_the_batch_in_order(batch: int, per_row: int, limit: int, sizes: list[int]) -> None:
    parts = batch_slices(batch, per_row, limit)
    assert [p.stop - p.start for p in parts] == sizes
    assert parts[0].start == 0 and parts[-1].stop == batch
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))


def test_impossible_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="exceed the launch grid"):
        batch_slices(2, 10, limit=8)
    with pytest.raises(ValueError, match="batch >= 1"):
        batch_slices(0, 4)
