"""One rank's share of a :class:`~surgery.data.BatchStream`: disjoint, deterministic, resumable.

The ``N`` ranks of a run read the same seeded stream of micro-batches; rank ``r`` takes
micro-batches ``r, r + N, r + 2N, ...`` and passes over the others without reading them. An
optimizer step of ``A`` micro-batches (``A`` a multiple of ``N``) therefore trains on exactly
the micro-batches a single process would use for that step, spread over the ranks, and after
each step every rank's cursor is the single-process cursor. That cursor is what
:meth:`state_dict` returns, so a checkpoint's data position does not depend on ``N`` and a
resumed run continues on exactly the next batches.
"""

from __future__ import annotations

from typing import Any

import torch

from .batches import BatchStream


class RankShard:
    """Micro-batches ``rank, rank + world_size, ...`` of ``stream``."""

    def __init__(self, stream: BatchStream, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.stream, self.rank, self.world_size = stream, rank, world_size

    def next(self) -> torch.Tensor:
        """This rank's next micro-batch, ``(batch_size, seq_len)`` int64; the others are skipped."""
        self.stream.skip(self.rank)
        batch = self.stream.next()
        self.stream.skip(self.world_size - 1 - self.rank)
        return batch

    __next__ = next

    def __iter__(self) -> RankShard:
        return self

    @property
    def tokens_served(self) -> int:
        """Tokens all ranks together have been served (the stream's global count)."""
        return self.stream.tokens_served

    def state_dict(self) -> dict[str, Any]:
        """The shared stream's cursor (the same on every rank after each round of ``N`` micro-batches)."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
