"""What every stage objective provides to the one :class:`~verify.runner.StageRunner`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from surgery.mixers.base import Mixer


@dataclass(frozen=True)
class Node:
    """A replaced attention node of the student: the mixer's path, layer and enclosing block."""

    path: str
    layer: int
    block: str


def replaced_nodes(student: nn.Module) -> list[Node]:
    """Every mixer in the student, in layer order."""
    nodes = [
        Node(path=name, layer=module.layer_idx, block=name.rsplit(".", 1)[0])
        for name, module in student.named_modules()
        if isinstance(module, Mixer)
    ]
    return sorted(nodes, key=lambda n: n.layer)


class Objective(ABC):
    """One alignment objective: its trainable parameters and a training micro-step.

    ``train_step`` runs forward and backward itself (stages 1 and 2 backpropagate one
    node/block at a time so only one layer's activations are alive) and returns
    float metrics, ``"loss"`` among them (the unscaled mean loss of this micro-batch).
    """

    stage: int = 0

    def __init__(self, teacher: nn.Module, student: nn.Module, nodes: list[Node]) -> None:
        self.teacher = teacher
        self.student = student
        self.nodes = nodes

    @abstractmethod
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs this stage trains; everything else is frozen."""

    @abstractmethod
    def train_step(self, input_ids: torch.Tensor, scale: float) -> dict[str, float]:
        """Forward + backward on one micro-batch, gradients scaled by ``scale``."""

    def freeze_others(self) -> list[nn.Parameter]:
        """Set ``requires_grad`` on exactly the trainable parameters; returns them."""
        chosen = [p for _, p in self.trainable()]
        ids = {id(p) for p in chosen}
        for p in self.student.parameters():
            p.requires_grad_(id(p) in ids)
        return chosen


def mixer_parameters(student: nn.Module, nodes: list[Node]) -> list[tuple[str, nn.Parameter]]:
    """All parameters of the replaced mixers."""
    return [(f"{n.path}.{k}", p) for n in nodes for k, p in student.get_submodule(n.path).named_parameters()]
