"""Stage 1, matrix orientation (per node).

For each replaced attention node, feed the teacher's own input to that layer and
minimise ``||M - P||_F`` per (batch, head), averaged, where ``P (b, h, L, L)`` is
the teacher's post-softmax attention and ``M`` the student mixer's materialised
mixing matrix. Only :meth:`Mixer.matrix_parameters` train. Nodes are
independent: each is backpropagated on its own, so one layer's ``L x L``
matrices are alive at a time (MOHAWK, Bick et al. 2024, arXiv 2408.10189, sec. 4.1).
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.errors import TrainingError
from surgery.mixers.base import Mixer

from .capture import Call, eager_attention, run_teacher
from .objective import Node, Objective


def matrix_distance(student_matrix: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Frobenius distance per (batch, head): ``(b, h, L, L) x2 -> (b, h)``."""
    return torch.linalg.matrix_norm(student_matrix.float() - teacher_probs.float(), ord="fro")


@torch.no_grad()
def teacher_probs(teacher: nn.Module, path: str, call: Call) -> torch.Tensor:
    """Replay a recorded attention call and return its probabilities ``(b, h, L, L)``.

    Both the recording and the replay must run inside :func:`~verify.capture.eager_attention`.
    """
    _, probs = call.replay(teacher.get_submodule(path))
    if probs is None:
        raise TrainingError(f"{path}: the teacher attention returned no probabilities (eager attention is required)")
    return probs


def node_distance(teacher: nn.Module, student: nn.Module, node: Node, call: Call) -> torch.Tensor:
    """Stage-1 distance of one node on one recorded call, ``(b, h)``, differentiable in the mixer."""
    mixer: Mixer = student.get_submodule(node.path)  # type: ignore[assignment]
    probs = teacher_probs(teacher, node.path, call)  # (b, h, L, L)
    matrix = mixer.materialize(call.hidden_states)  # (b, h, L, L)
    return matrix_distance(matrix, probs)


def check_heads(teacher: nn.Module, student: nn.Module, nodes: list[Node]) -> None:
    """Stage 1 compares head by head: the mixer must have as many matrix heads as the teacher."""
    heads = teacher.config.num_attention_heads
    for node in nodes:
        mixer: Mixer = student.get_submodule(node.path)  # type: ignore[assignment]
        if mixer.n_matrix_heads != heads:
            raise TrainingError(
                f"stage 1 at {node.path}: the mixer has {mixer.n_matrix_heads} heads but the teacher attention has "
                f"{heads}; set the mixer's head count to {heads} or disable stage 1 (stages.stage1.enabled=false)"
            )


class MatrixOrientation(Objective):
    """Stage 1: train what builds each mixer's matrix toward the teacher's attention matrix."""

    stage = 1

    def __init__(self, teacher: nn.Module, student: nn.Module, nodes: list[Node]) -> None:
        super().__init__(teacher, student, nodes)
        check_heads(teacher, student, nodes)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        out = []
        for node in self.nodes:
            mixer: Mixer = self.student.get_submodule(node.path)  # type: ignore[assignment]
            ids = {id(p) for p in mixer.matrix_parameters()}
            out += [(f"{node.path}.{k}", p) for k, p in mixer.named_parameters() if id(p) in ids]
        return out

    def train_step(self, input_ids: torch.Tensor, scale: float) -> dict[str, float]:
        total = 0.0
        with eager_attention(self.teacher):  # recorded calls are replayed with the same (eager) masks
            recorded = run_teacher(self.teacher, input_ids, attention_paths=[n.path for n in self.nodes])
            for node in self.nodes:
                loss = node_distance(self.teacher, self.student, node, recorded.attention[node.path]).mean()
                (loss * scale / len(self.nodes)).backward()
                total += loss.item()
        return {"loss": total / len(self.nodes)}
