"""Process-group setup and rank facts for ``torchrun`` launches (PyTorch distributed only).

A run started by ``torchrun --nproc-per-node N -m surgery apply RECIPE`` finds ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment; :func:`init_ranks` then joins the
process group (NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on CPU). A plain run gets
:attr:`Ranks.single` and never touches ``torch.distributed``: the same code runs either way,
the collectives below are no-ops for one process.

Rank 0 alone writes (checkpoints, metrics, the student) and shows progress
(:func:`surgery.log.quiet` is true on the other ranks). An error on any rank ends that rank's
process with its rank named in the message (:func:`surgery.log.rank_prefix`); ``torchrun``
then stops the other ranks, which are waiting in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import SurgeryError
from .runtime import resolve_device

# Ranks wait in a collective while rank 0 writes a checkpoint or a slow rank measures:
# generous, so that only a dead peer (which torchrun reports) ends a run.
TIMEOUT = timedelta(minutes=int(os.environ.get("SURGERY_DIST_TIMEOUT_MIN", "60")))


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank, how many there are, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launched: bool  # started by torchrun (a process group exists), even with one rank
    owns_group: bool = False  # this object created the process group (and destroys it)

    @classmethod
    def single(cls, device: torch.device) -> Ranks:
        return cls(rank=0, world_size=1, local_rank=0, device=device, launched=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.launched:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place; returns it."""
        if self.launched and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_module(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (replicas start identical)."""
        if not (self.launched and self.world_size > 1):
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling caches on disk), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self) -> None:
        """Leave the process group if this object joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True in a process started by ``torchrun`` (or anything that sets its environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _env_int(name: str) -> int:
    value = os.environ.get(name, "0")
    try:
        return int(value)
    except ValueError:
        raise SurgeryError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def rank_device(spec: str, local_rank: int) -> torch.device:
    """The device of one rank: ``cuda:LOCAL_RANK`` for ``auto``/``cuda``, else the CPU."""
    if spec.startswith("cuda:"):
        raise SurgeryError(
            f"device={spec!r} names one GPU, but under torchrun each rank uses cuda:LOCAL_RANK; "
            "set device=cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    device = resolve_device(spec)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise SurgeryError(f"device={spec!r}: torchrun runs use CUDA (NCCL) or the CPU (gloo), not {device.type}")
    if local_rank >= torch.cuda.device_count():
        raise SurgeryError(
            f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
            "lower --nproc-per-node or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", local_rank)


def init_ranks(device_spec: str) -> Ranks:
    """Join the torchrun process group (if launched by it) and return this process's :class:`Ranks`."""
    if not launched_by_torchrun():
        return Ranks.single(resolve_device(device_spec))
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    device = rank_device(device_spec, local)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    return Ranks(rank=rank, world_size=world, local_rank=local, device=device, launched=True, owns_group=owns)
