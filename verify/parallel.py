"""How one stage's training is spread over the ranks of a ``torchrun`` launch.

The one :class:`~verify.runner.StageRunner` trains the same way on one process or many; a
:class:`Strategy` is what differs, at four points:

- :meth:`Strategy.prepare`: the module the objective trains (the student itself, or a sharded copy);
- :meth:`Strategy.reduce`: after a step's micro-batches, gradients and metrics are summed over ranks;
- :meth:`Strategy.clip`: the global gradient norm (and clipping) over all ranks' shards;
- :meth:`Strategy.checkpoint_view` / :meth:`Strategy.finish`: full weights for a checkpoint on rank 0,
  and back into the plain student at the end of the stage.

Stages 1 and 2 are data-parallel (:class:`DataParallel`): every rank holds the teacher and the
student, trains on its own micro-batches (:class:`~surgery.data.RankShard`), and the gradients
are summed over ranks once per optimizer step (one all-reduce per bucket, like DDP with
``no_sync`` during accumulation; DDP itself does not fit: stages 1-2 call mixers and blocks
directly, not the student's forward). Stage 3 shards the student with FSDP2
(:class:`~verify.fsdp.FullyShardedStudent`); the teacher stays replicated. Every rank's micro-batch
gradients are scaled by ``1 / (micro-batches per step over all ranks)`` and reductions are
sums, so a step's update is the single-process update (same global batch) up to float
summation order. See docs/design.md, "Multi-GPU".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from surgery.distributed import Ranks
from surgery.recipe import DistributedConfig

BUCKET_BYTES = 256 << 20  # gradients all-reduced per flat bucket of at most this size


class Strategy:
    """One process: nothing to spread. The base of the distributed strategies."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks

    @classmethod
    def single_process(cls, device: torch.device) -> Strategy:
        return cls(Ranks.single(device))

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    def prepare(self, student: nn.Module) -> nn.Module:
        """The module the stage's objective trains (here: ``student`` itself)."""
        return student

    def reduce(self, params: list[nn.Parameter], metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum this step's gradients and metrics over ranks (metrics are already scaled per micro-batch).

        Metrics stay on the device (0-d tensors): one all-reduce of their stack, no host read.
        """
        return self.reduce_metrics(metrics)

    def reduce_metrics(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.world_size == 1:
            return metrics
        keys = list(metrics)  # the same keys, in the same order, on every rank
        values = torch.stack([torch.as_tensor(metrics[k], device=self.ranks.device).float().reshape(()) for k in keys])
        return dict(zip(keys, self.ranks.all_reduce_sum(values).unbind()))

    def clip(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping (a 0-d tensor)."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    @contextmanager
    def checkpoint_view(
        self, student: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> Iterator[tuple[nn.Module, Any]]:
        """``(student with the current weights, optimizer or its full state dict)`` for rank 0 to save."""
        yield student, optimizer

    def finish(self, student: nn.Module) -> None:
        """Leave the trained weights in ``student`` (already there unless sharded)."""


class DataParallel(Strategy):
    """Stages 1-2: replicas on every rank; gradients summed over ranks once per optimizer step."""

    def reduce(self, params: list[nn.Parameter], metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.world_size > 1:
            grads = [p.grad for p in params if p.grad is not None]  # the same set on every rank
            for bucket in _buckets(grads, BUCKET_BYTES):
                flat = self.ranks.all_reduce_sum(torch.cat([g.reshape(-1) for g in bucket]))
                for g, synced in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(synced.view_as(g))
        return self.reduce_metrics(metrics)


def _buckets(tensors: list[torch.Tensor], max_bytes: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each at most ``max_bytes`` (or one tensor)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > max_bytes or (t.dtype, t.device) != (bucket[0].dtype, bucket[0].device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def is_sharded(tensor: Any) -> bool:
    """A DTensor: FSDP2's sharded parameters, their gradients and optimizer states."""
    return hasattr(tensor, "device_mesh")


def strategy_for(stage: int, ranks: Ranks, config: DistributedConfig) -> Strategy:
    """Stages 1-2: :class:`DataParallel`; stage 3: FSDP2 (:class:`~verify.fsdp.FullyShardedStudent`);
    one process: :class:`Strategy`."""
    if not ranks.launched:
        return Strategy(ranks)
    if stage == 3:
        from .fsdp import FullyShardedStudent

        return FullyShardedStudent(ranks, config)
    return DataParallel(ranks)
