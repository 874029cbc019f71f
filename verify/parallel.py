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
(:class:`FullyShardedStudent`); the teacher stays replicated. Every rank's micro-batch
gradients are scaled by ``1 / (micro-batches per step over all ranks)`` and reductions are
sums, so a step's update is the single-process update (same global batch) up to float
summation order. See docs/design.md, "Multi-GPU".
"""

from __future__ import annotations

import copy
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


def release(module: nn.Module) -> None:
    """Drop ``module``'s parameter storage (its sharded copy is what trains); buffers stay."""
    for p in module.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


class FullyShardedStudent(DataParallel):
    """Stage 3: the student sharded with FSDP2 (``fully_shard`` per decoder layer and on the base model).

    A copy of the student is sharded and trained; the plain student's parameters are released
    meanwhile (its buffers, never trained, stay) and receive the trained weights in
    :meth:`finish`. The FSDP root is the base model (embeddings, layers, final norm), not the
    causal-LM wrapper, so an objective may call the base model and use the LM head's weight
    directly outside any forward (the fused distillation loss does): the LM head's weight is
    therefore not sharded (outside the root when untied, an ignored parameter of the root when
    tied to the embedding); it is replicated and its gradient all-reduced as in stage 2.
    Sharded gradients are reduce-scattered as sums (FSDP2 would average). The teacher is not
    sharded: it is replicated on every rank.
    """

    def __init__(self, ranks: Ranks, config: DistributedConfig) -> None:
        super().__init__(ranks)
        self.config = config
        self.sharded: nn.Module | None = None

    def policy(self) -> Any:
        """FSDP2's mixed-precision policy from the recipe's ``distributed`` section."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=getattr(torch, self.config.fsdp_param_dtype),
                                    reduce_dtype=getattr(torch, self.config.fsdp_reduce_dtype))

    def prepare(self, student: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        from rewrites.adapters import get_adapter

        mesh = init_device_mesh(self.ranks.device.type, (self.world_size,))
        sharded = copy.deepcopy(student)
        options = {"mesh": mesh, "mp_policy": self.policy()}
        for _, layer in get_adapter(sharded).decoder_layers():
            fully_shard(layer, reshard_after_forward=self.config.fsdp_reshard_after_forward, **options)
        base = getattr(sharded, "base_model", sharded)
        head = sharded.get_output_embeddings()
        tied = {head.weight} if base is not sharded and head is not None and any(
            head.weight is p for p in base.parameters()) else set()
        fully_shard(base, ignored_params=tied or None, **options)  # a tied head's weight stays replicated
        for module in sharded.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sums: the micro-batch scale already averages
                module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
        release(student)
        self.sharded = sharded
        return sharded

    def reduce(self, params: list[nn.Parameter], metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FSDP2 has reduce-scattered the sharded gradients; replicated ones (an untied head) are summed here."""
        return super().reduce([p for p in params if not _is_sharded(p)], metrics)

    def clip(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global norm over sharded and replicated gradients together; both clipped by it."""
        groups = [[p for p in params if _is_sharded(p)], [p for p in params if not _is_sharded(p)]]
        norms = []
        for group in groups:
            grads = [p.grad for p in group if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads)
                norms.append(norm.full_tensor() if _is_sharded(norm) else norm)  # type: ignore[union-attr]
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.ranks.device)
        for group in groups:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    def _gather(self, student: nn.Module, to_cpu: bool) -> None:
        """Every parameter's full tensor (a collective) into ``student``: on every rank, or rank 0's CPU."""
        assert self.sharded is not None
        for name, p in self.sharded.named_parameters():
            full = p.full_tensor().detach() if _is_sharded(p) else p.detach().clone()  # type: ignore[attr-defined]
            if not to_cpu:
                student.get_parameter(name).data = full
            elif self.ranks.is_main:
                student.get_parameter(name).data = full.cpu()

    @contextmanager
    def checkpoint_view(
        self, student: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> Iterator[tuple[nn.Module, Any]]:
        self._gather(student, to_cpu=True)
        state = None if optimizer is None else full_optimizer_state(optimizer, keep=self.ranks.is_main)
        try:
            yield student, state
        finally:
            if self.ranks.is_main:
                release(student)

    def finish(self, student: nn.Module) -> None:
        self._gather(student, to_cpu=False)
        self.sharded = None


def _is_sharded(tensor: Any) -> bool:
    """A DTensor (FSDP2's sharded parameters and their gradients and norms)."""
    return hasattr(tensor, "device_mesh")


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded tensor gathered in full (a collective; CPU, where ``keep``)."""
    state = optimizer.state_dict()
    full: dict[int, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        full[index] = {}
        for key, value in entry.items():
            if _is_sharded(value):
                value = value.full_tensor()
            if keep:
                full[index][key] = value.detach().cpu() if torch.is_tensor(value) else value
    return {"state": full, "param_groups": state["param_groups"]}


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full optimizer-state tensor cut to ``param``'s local shard when ``param`` is sharded (a DTensor)."""
    if not _is_sharded(param) or value.dim() == 0 or value.shape != param.shape:  # e.g. Adam's step count
        return value
    from torch.distributed.tensor import distribute_tensor

    local = param.to_local()  # type: ignore[attr-defined]
    return distribute_tensor(value.to(local.device), param.device_mesh, param.placements,  # type: ignore[attr-defined]
                             src_data_rank=None)


def strategy_for(stage: int, ranks: Ranks, config: DistributedConfig) -> Strategy:
    """Stage 1-2: :class:`DataParallel`; stage 3: :class:`FullyShardedStudent`; one process: :class:`Strategy`."""
    if not ranks.launched:
        return Strategy(ranks)
    return FullyShardedStudent(ranks, config) if stage == 3 else DataParallel(ranks)
