"""Stage 1, matrix orientation (per node).

For each replaced attention node, feed the teacher's own input to that layer and
minimise ``||M - P||_F`` per (batch, head), averaged, where ``P (b, h, L, L)`` is
the teacher's post-softmax attention and ``M`` the student mixer's mixing matrix.
Only :meth:`Mixer.matrix_parameters` train. Nodes are independent: each is
backpropagated on its own (MOHAWK, Bick et al. 2024, arXiv 2408.10189, sec. 4.1).

Two ways to get there, one teacher forward per micro-batch either way:

* **factored** (the default): the teacher's attention ``q``/``k`` are recorded as attention
  computed them (:func:`~verify.capture.record_attention_qk`) and the distance comes from
  them and the mixer's :meth:`~surgery.mixers.base.Mixer.matrix_factors`
  (:func:`surgery.ops.stage1.matrix_squared_distance`: fused on CUDA, nothing ``L x L``);
* **replayed**: when some teacher attention is more than a causal softmax (a sliding window
  shorter than the sequence, soft-capping, ...), its calls are replayed under eager attention
  for the probabilities and the mixer's matrix is materialised. The objective switches for
  good the first time it sees such a call.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.errors import TrainingError
from surgery.mixers.base import Mixer

from surgery.ops.stage1 import attention_probs, matrix_squared_distance

from .capture import AttentionQK, Call, eager_attention, record_attention_qk, run_teacher
from .objective import Node, Objective


# why a node's q/k were not recorded: its attention computes the softmax itself (BLOOM, MPT, GPT-Neo, Falcon's
# own paths) instead of calling transformers' AttentionInterface; stage 1 then replays its eager attention
NOT_RECORDED = "its attention does not call transformers' AttentionInterface, so q/k could not be recorded"


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


def factored_distance(mixer: Mixer, u: torch.Tensor, qk: AttentionQK) -> torch.Tensor:
    """Stage-1 distance ``(b, h)`` from the teacher's recorded ``q``/``k`` and the mixer on its input ``u``."""
    if not mixer.has_matrix_factors():  # a mixer without SSD factors: materialise both
        return matrix_distance(mixer.materialize(u), attention_probs(qk.q, qk.k, qk.scale))
    squared = matrix_squared_distance(qk.q, qk.k, qk.scale, mixer.matrix_factors(u))  # (b, h)
    return squared.clamp_min(1e-30).sqrt()


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
        self.factored = True  # until a teacher attention turns out not to be a plain causal softmax
        self.replayed_because: str | None = None

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        out = []
        for node in self.nodes:
            mixer: Mixer = self.student.get_submodule(node.path)  # type: ignore[assignment]
            ids = {id(p) for p in mixer.matrix_parameters()}
            out += [(f"{node.path}.{k}", p) for k, p in mixer.named_parameters() if id(p) in ids]
        return out

    def train_step(self, input_ids: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
        paths = [n.path for n in self.nodes]
        if self.factored:
            with record_attention_qk(self.teacher, paths) as qk:
                recorded = run_teacher(self.teacher, input_ids, attention_paths=paths)
            not_plain = [f"{p}: {qk[p].why}" if p in qk else f"{p}: {NOT_RECORDED}" for p in paths
                         if p not in qk or not qk[p].plain]
            if not not_plain:
                return self._backward(lambda node: factored_distance(
                    self.student.get_submodule(node.path), recorded.attention[node.path].hidden_states, qk[node.path]),
                    scale, input_ids.device)
            self.factored, self.replayed_because = False, not_plain[0]
        with eager_attention(self.teacher):  # recorded calls are replayed with the same (eager) masks
            recorded = run_teacher(self.teacher, input_ids, attention_paths=paths)
            return self._backward(lambda node: node_distance(self.teacher, self.student, node,
                                                             recorded.attention[node.path]), scale, input_ids.device)

    def _backward(self, distance, scale: float, device: torch.device) -> dict[str, torch.Tensor]:
        """Backpropagate each node's mean distance on its own; the mean over nodes, on the device."""
        total = torch.zeros((), device=device)
        for node in self.nodes:
            loss = distance(node).mean()
            (loss * scale / len(self.nodes)).backward()
            total += loss.detach()
        return {"loss": total / len(self.nodes)}
