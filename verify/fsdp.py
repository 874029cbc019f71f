"""Stage 3 under ``torchrun``: the student sharded with FSDP2, and its checkpoints gathered in full.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards a copy of the student per decoder layer and on
the base model; :class:`FullyShardedStudent` is the :class:`~verify.parallel.Strategy` the stage runner
calls. Checkpoints stay in the single-process format: every sharded tensor is gathered in full for
rank 0 (:func:`full_optimizer_state`), and on resume each rank keeps its shard of the full tensors
(:func:`shard_like`). See docs/design.md, "Multi-GPU".
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

from .parallel import DataParallel, is_sharded


def release(module: nn.Module) -> None:
    """Drop ``module``'s parameter storage (its sharded copy is what trains); buffers stay."""
    for p in module.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


class FullyShardedStudent(DataParallel):
    """Stage 3: the student sharded with FSDP2 (``fully_shard`` per decoder layer and on the base model).

    A copy of the student is sharded and trained; the plain student's parameters are released
    meanwhile (its buffers, never trained, stay) and receive the trained weights in
    :meth:`finish`. The FSDP root is the module holding the decoder layers (the base model, or
    OPT's decoder: embeddings, layers, final norm), not the causal-LM wrapper, so an objective may
    call the base model and use the LM head's weight
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

    def policy(self, output_dtype: torch.dtype | None = None) -> Any:
        """FSDP2's mixed-precision policy from the recipe's ``distributed`` section."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=getattr(torch, self.config.fsdp_param_dtype),
                                    reduce_dtype=getattr(torch, self.config.fsdp_reduce_dtype),
                                    output_dtype=output_dtype)

    def prepare(self, student: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        from rewrites.adapters import get_adapter

        mesh = init_device_mesh(self.ranks.device.type, (self.world_size,))
        sharded = copy.deepcopy(student)
        adapter = get_adapter(sharded)
        for _, layer in adapter.decoder_layers():
            fully_shard(layer, mesh=mesh, mp_policy=self.policy(),
                        reshard_after_forward=self.config.fsdp_reshard_after_forward)
        # the root: the module holding the layers, which both the causal-LM forward and the base model call
        # (OPT's causal LM calls model.decoder, not model); the head outside it stays replicated
        root = sharded.get_submodule(adapter.layers_path.rpartition(".")[0])
        head = sharded.get_output_embeddings()
        tied = {head.weight} if head is not None and any(head.weight is p for p in root.parameters()) else set()
        fully_shard(root, mesh=mesh, ignored_params=tied or None,  # a tied head's weight stays replicated
                    mp_policy=self.policy(output_dtype=torch.float32))  # the replicated head's dtype
        for module in sharded.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sums: the micro-batch scale already averages
                module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
        release(student)
        self.sharded = sharded
        return sharded

    def reduce(self, params: list[nn.Parameter], metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FSDP2 has reduce-scattered the sharded gradients; replicated ones (an untied head) are summed here."""
        return super().reduce([p for p in params if not is_sharded(p)], metrics)

    def clip(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global norm over sharded and replicated gradients together; both clipped by it."""
        groups = [[p for p in params if is_sharded(p)], [p for p in params if not is_sharded(p)]]
        norms = []
        for group in groups:
            grads = [p.grad for p in group if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads)
                norms.append(norm.full_tensor() if is_sharded(norm) else norm)  # type: ignore[union-attr]
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.ranks.device)
        for group in groups:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    def _gather(self, student: nn.Module, to_cpu: bool) -> None:
        """Every parameter's full tensor (a collective) into ``student``: on every rank, or rank 0's CPU."""
        assert self.sharded is not None
        for name, p in self.sharded.named_parameters():
            full = p.full_tensor().detach() if is_sharded(p) else p.detach().clone()  # type: ignore[attr-defined]
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


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded tensor gathered in full (a collective; CPU, where ``keep``)."""
    state = optimizer.state_dict()
    full: dict[int, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        full[index] = {}
        for key, value in entry.items():
            if is_sharded(value):
                value = value.full_tensor()
            if keep:
                full[index][key] = value.detach().cpu() if torch.is_tensor(value) else value
    return {"state": full, "param_groups": state["param_groups"]}


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full optimizer-state tensor cut to ``param``'s local shard when ``param`` is sharded (a DTensor)."""
    if not is_sharded(param) or value.dim() == 0 or value.shape != param.shape:  # e.g. Adam's step count
        return value
    from torch.distributed.tensor import distribute_tensor

    local = param.to_local()  # type: ignore[attr-defined]
    return distribute_tensor(value.to(local.device), param.device_mesh, param.placements,  # type: ignore[attr-defined]
                             src_data_rank=None)
