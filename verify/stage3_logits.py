"""Stage 3, knowledge distillation (end to end).

``loss = kl_weight * T^2 * KL(softmax(t/T) || softmax(s/T)) + ce_weight * CE(s, next token)``,
averaged over tokens; the whole student or only its mixers train (MOHAWK, Bick
et al. 2024, arXiv 2408.10189, sec. 4.3; Hinton et al. 2015 for the ``T^2`` factor).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .objective import Node, Objective, mixer_parameters


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(p_teacher || p_student)`` per position: ``(b, L, V) x2 -> (b, L)``."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood per position: ``(b, L, V), (b, L) -> (b, L-1)``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none").view(
        input_ids.shape[0], -1
    )


class Distillation(Objective):
    """Stage 3: match the teacher's next-token distribution (optionally plus hard labels)."""

    stage = 3

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        nodes: list[Node],
        temperature: float = 1.0,
        kl_weight: float = 1.0,
        ce_weight: float = 0.0,
        train: Literal["all", "mixers", "non_embedding"] = "all",
    ) -> None:
        super().__init__(teacher, student, nodes)
        self.temperature, self.kl_weight, self.ce_weight, self.train = temperature, kl_weight, ce_weight, train

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        if self.train == "mixers":
            return mixer_parameters(self.student, self.nodes)
        frozen: set[int] = set()
        if self.train == "non_embedding":
            for module in (self.student.get_input_embeddings(), self.student.get_output_embeddings()):
                if module is not None:
                    frozen |= {id(p) for p in module.parameters()}
        seen: set[int] = set()
        out = []
        for name, p in self.student.named_parameters(remove_duplicate=False):
            if id(p) not in frozen and id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
        return out

    def train_step(self, input_ids: torch.Tensor, scale: float) -> dict[str, float]:
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits
        student_logits = self.student(input_ids=input_ids, use_cache=False).logits
        kl = kl_per_token(teacher_logits, student_logits, self.temperature).mean()
        loss = self.kl_weight * self.temperature**2 * kl
        metrics = {"kl": kl.item()}
        if self.ce_weight:
            ce = next_token_nll(student_logits, input_ids).mean()
            loss = loss + self.ce_weight * ce
            metrics["ce"] = ce.item()
        (loss * scale).backward()
        metrics["loss"] = loss.item()
        return metrics
