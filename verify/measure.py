"""One held-out measurement of a student against its teacher: all three stage metrics at once.

Per replaced node the stage-1 Frobenius distance (on the first ``stage1``
batches, whose ``L x L`` matrices are the expensive part), per replaced block
the stage-2 L2 distance, and end to end KL(teacher || student), both
perplexities and top-1 agreement. Each batch is one teacher pass with hooks
and one student pass; nothing is kept across batches but running sums.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from surgery.errors import TrainingError
from surgery.log import progress
from surgery.runtime import autocast

from .capture import eager_attention, run_teacher
from .objective import Node
from .stage1_matrix import check_heads, node_distance
from .stage2_hidden import unit_distance
from .stage3_logits import kl_per_token, next_token_nll


@dataclass
class Measurement:
    """Held-out alignment of a student; ``stage1`` is empty when the heads cannot be compared."""

    stage1: dict[str, float] = field(default_factory=dict)  # node path -> mean Frobenius distance
    stage2: dict[str, float] = field(default_factory=dict)  # block path -> mean per-token L2
    kl: float = math.nan
    perplexity: float = math.nan
    teacher_perplexity: float = math.nan
    top1_agreement: float = math.nan
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def mean_stage1(self) -> float:
        return sum(self.stage1.values()) / len(self.stage1) if self.stage1 else math.nan

    @property
    def mean_stage2(self) -> float:
        return sum(self.stage2.values()) / len(self.stage2) if self.stage2 else math.nan


def _stage1_comparable(teacher: nn.Module, student: nn.Module, nodes: list[Node]) -> bool:
    try:
        check_heads(teacher, student, nodes)
    except TrainingError:
        return False
    return bool(nodes)


@torch.no_grad()
def measure(
    teacher: nn.Module,
    student: nn.Module,
    nodes: list[Node],
    batches: list[torch.Tensor],
    *,
    stage1_batches: int = 1,
    device: torch.device,
    precision: str = "fp32",
    desc: str = "measure",
) -> Measurement:
    """Measure ``student`` on held-out ``batches`` (each ``(b, L)`` token ids)."""
    if not batches:
        raise TrainingError("no held-out batches to measure on; raise verify.tokens or data.heldout_fraction")
    was_training = student.training
    student.eval()
    s1_sums: dict[str, float] = {n.path: 0.0 for n in nodes}
    s2_sums: dict[str, float] = {n.block: 0.0 for n in nodes}
    with_stage1 = _stage1_comparable(teacher, student, nodes)
    n_s1 = 0
    nll_s = nll_t = kl = agree = 0.0
    tokens = 0
    for i, cpu_batch in enumerate(progress(batches, desc=desc, unit="batch")):
        ids = cpu_batch.to(device)
        with autocast(precision, device):
            if with_stage1 and i < stage1_batches:
                with eager_attention(teacher):
                    recorded = run_teacher(teacher, ids, attention_paths=[n.path for n in nodes])
                    for node in nodes:
                        call = recorded.attention[node.path]
                        s1_sums[node.path] += node_distance(teacher, student, node, call).mean().item()
                n_s1 += 1
                del recorded
            recorded = run_teacher(teacher, ids, block_paths=[n.block for n in nodes], keep_logits=True)
            for node in nodes:
                s2_sums[node.block] += unit_distance(student, node.block, recorded.blocks[node.block]).item()
            student_logits = student(input_ids=ids, use_cache=False).logits
        t_logits = recorded.logits
        count = ids.shape[0] * (ids.shape[1] - 1)
        kl += kl_per_token(t_logits[:, :-1], student_logits[:, :-1]).sum().item()
        nll_s += next_token_nll(student_logits, ids).sum().item()
        nll_t += next_token_nll(t_logits, ids).sum().item()
        agree += (t_logits[:, :-1].argmax(-1) == student_logits[:, :-1].argmax(-1)).sum().item()
        tokens += count
    student.train(was_training)
    n = len(batches)
    result = Measurement(
        stage1={p: v / n_s1 for p, v in s1_sums.items()} if n_s1 else {},
        stage2={p: v / n for p, v in s2_sums.items()},
        kl=kl / tokens,
        perplexity=math.exp(nll_s / tokens),
        teacher_perplexity=math.exp(nll_t / tokens),
        top1_agreement=agree / tokens,
        tokens=tokens,
    )
    return result
