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

from surgery.ops.distill_loss import fused_distill_loss

from .objective import Node, Objective, mixer_parameters

# Config fields of families whose logits are more than ``lm_head(hidden)`` (soft-capping, scaling).
POST_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def head_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(base model, LM head)`` when the family's logits are ``head(base(ids).last_hidden_state)``, else None."""
    config = model.config.get_text_config(decoder=True)
    if any(getattr(config, f, None) not in (None, 1, 1.0) for f in POST_HEAD_FIELDS):
        return None
    head, base = model.get_output_embeddings(), getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or base is None or base is model:
        return None
    return base, head


@torch.no_grad()
def heads_are_plain(models: list[nn.Module], input_ids: torch.Tensor) -> bool:
    """Whether :func:`head_parts` reproduces each model's logits on a short probe (within 1e-4 relative)."""
    probe = input_ids[:1, :16]
    for model in models:
        parts = head_parts(model)
        if parts is None:
            return False
        full = model(input_ids=probe, use_cache=False).logits.float()
        split = parts[1](parts[0](input_ids=probe, use_cache=False).last_hidden_state).float()
        if split.shape != full.shape or (split - full).abs().max() > 1e-4 * full.abs().max().clamp_min(1e-6):
            return False
    return True


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
        self.fused: bool | None = None  # decided on the first batch (heads_are_plain)

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

    def train_step(self, input_ids: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
        if self.fused is None:
            self.fused = heads_are_plain([self.teacher, self.student], input_ids)
        loss, metrics = self._fused_loss(input_ids) if self.fused else self._full_loss(input_ids)
        (loss * scale).backward()
        metrics["loss"] = loss.detach()
        return metrics

    def _fused_loss(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (t_base, t_head), (s_base, s_head) = head_parts(self.teacher), head_parts(self.student)  # type: ignore[misc]
        with torch.no_grad():
            h_t = t_base(input_ids=input_ids, use_cache=False).last_hidden_state  # (b, L, d)
        h_s = s_base(input_ids=input_ids, use_cache=False).last_hidden_state  # (b, L, d)
        targets = torch.cat([input_ids[:, 1:], input_ids.new_full((input_ids.shape[0], 1), -1)], dim=1)  # (b, L)
        loss, kl, ce = fused_distill_loss(
            h_s.flatten(0, 1), s_head.weight, s_head.bias, h_t.flatten(0, 1), t_head.weight, t_head.bias,
            targets.flatten(), temperature=self.temperature, kl_weight=self.kl_weight, ce_weight=self.ce_weight,
        )
        metrics = {"kl": kl.detach()}
        if self.ce_weight:
            metrics["ce"] = ce.detach()
        return loss, metrics

    def _full_loss(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits
        student_logits = self.student(input_ids=input_ids, use_cache=False).logits
        kl = kl_per_token(teacher_logits, student_logits, self.temperature).mean()
        loss = self.kl_weight * self.temperature**2 * kl
        metrics = {"kl": kl.detach()}
        if self.ce_weight:
            ce = next_token_nll(student_logits, input_ids).mean()
            loss = loss + self.ce_weight * ce
            metrics["ce"] = ce.detach()
        return loss, metrics
