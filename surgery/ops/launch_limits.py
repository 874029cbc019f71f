"""CUDA's launch-grid limits, and splitting a batch so that a kernel's grid stays inside them.

The fused kernels launch one program per (chunk, batch x head) with ``batch x head`` on the grid's
second axis, which CUDA caps at 65,535 (the first axis allows 2^31 - 1). A decode benchmark at batch
8,192 with 9 heads (73,728 programs) failed with Triton's "invalid argument". The rows of a batch
are independent in every kernel here, so a larger batch is run in slices.
"""

from __future__ import annotations

GRID_Y_MAX = 65_535  # CUDA: gridDim.y (and z) at most 2^16 - 1


def batch_slices(batch: int, per_row: int, limit: int | None = None) -> list[slice]:
    """Contiguous batch slices, each with ``len(slice) * per_row <= limit`` programs on the grid's y axis.

    ``per_row``: programs each batch row launches on that axis (the head count); ``limit`` defaults
    to :data:`GRID_Y_MAX` (read at call time, so that tests can lower it).
    """
    limit = GRID_Y_MAX if limit is None else limit
    if per_row < 1 or batch < 1:
        raise ValueError(f"batch_slices needs batch >= 1 and per_row >= 1, got {batch}, {per_row}")
    if per_row > limit:
        raise ValueError(f"{per_row} heads exceed the launch grid's limit of {limit} programs for even one row")
    rows = limit // per_row
    return [slice(start, min(start + rows, batch)) for start in range(0, batch, rows)]
