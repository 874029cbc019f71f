"""Stage 2, hidden-state alignment (per block).

Given the teacher's input to a block, minimise the per-token L2 distance
``mean_t ||student_block(u)_t - teacher_block(u)_t||_2`` (un-squared, as the
reference code does), either for the whole block or for the mixer output alone
(before the residual). Only mixer parameters train; blocks are independent and
backpropagated one at a time (MOHAWK, Bick et al. 2024, arXiv 2408.10189, sec. 4.2).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .capture import Call, first_tensor, run_teacher
from .objective import Node, Objective, mixer_parameters


def hidden_distance(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the L2 distance: ``(b, L, d) x2 -> ()``."""
    return (student_out.float() - teacher_out.float()).norm(dim=-1).mean()


def unit_path(node: Node, target: Literal["block", "mixer"]) -> str:
    """The module compared in stage 2: the decoder block, or the mixer itself."""
    return node.block if target == "block" else node.path


def unit_distance(student: nn.Module, path: str, call: Call) -> torch.Tensor:
    """Replay the teacher's recorded call on the student's module at ``path`` and compare outputs."""
    return hidden_distance(first_tensor(call.replay(student.get_submodule(path))), call.output)


class HiddenStateAlignment(Objective):
    """Stage 2: train mixers so each student block reproduces its teacher block."""

    stage = 2

    def __init__(
        self, teacher: nn.Module, student: nn.Module, nodes: list[Node], target: Literal["block", "mixer"] = "block"
    ) -> None:
        super().__init__(teacher, student, nodes)
        self.target = target
        self.paths = [unit_path(n, target) for n in nodes]

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return mixer_parameters(self.student, self.nodes)

    def train_step(self, input_ids: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
        if self.target == "block":
            recorded = run_teacher(self.teacher, input_ids, block_paths=self.paths).blocks
        else:
            recorded = run_teacher(self.teacher, input_ids, attention_paths=self.paths).attention
        total = torch.zeros((), device=input_ids.device)
        for path in self.paths:
            loss = unit_distance(self.student, path, recorded[path])
            (loss * scale / len(self.paths)).backward()
            total += loss.detach()
        return {"loss": total / len(self.paths)}
