"""Held-out metrics, one code path for teachers and students.

``perplexity`` is exp of the mean next-token negative log-likelihood over every
predicted position of the batches (``L - 1`` per sequence). ``top1_agreement`` is
the fraction of positions where two models' most likely next tokens agree.

    batches = heldout_batches(corpus, seq_len=512, batch_size=4, tokens=8192)
    perplexity(teacher.model, batches)                     # e.g. 17.3
    top1_agreement(teacher.model, student, batches)        # e.g. 0.62
    english_perplexity(teacher.model, teacher.tokenizer)   # sanity check on builtin English prose
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["english_perplexity", "mean_nll", "perplexity", "top1_agreement"]


def _device_of(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(b, L) token ids -> (b, L, V) float32 logits, without a KV/SSM cache."""
    out = model(input_ids=input_ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def _bar(batches: Sequence[torch.Tensor], progress: bool, desc: str) -> Iterable[torch.Tensor]:
    if not progress:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, unit="batch")


@torch.inference_mode()
def mean_nll(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """(mean next-token NLL in nats, number of predicted positions) over ``batches`` of (b, L) ids."""
    device = _device_of(model, device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in _bar(batches, progress, "perplexity"):
            ids = batch.to(device)  # (b, L)
            logits = _logits(model, ids)  # (b, L, V)
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),  # (b*(L-1), V)
                ids[:, 1:].reshape(-1),  # (b*(L-1),)
                reduction="sum",
            )
            total += nll.item()
            count += ids.shape[0] * (ids.shape[1] - 1)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no positions to score: give at least one batch of sequences longer than one token")
    return total / count, count


def perplexity(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over every predicted position of ``batches``."""
    nll, _ = mean_nll(model, batches, device=device, progress=progress)
    return math.exp(nll)


@torch.inference_mode()
def top1_agreement(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """Fraction of positions where the two models' argmax next tokens are the same."""
    device = _device_of(student, device)
    modes = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    same, count = 0, 0
    try:
        for batch in _bar(batches, progress, "agreement"):
            ids = batch.to(device)  # (b, L)
            a = _logits(teacher, ids).argmax(-1)  # (b, L)
            b = _logits(student, ids).argmax(-1)  # (b, L)
            same += int((a == b).sum())
            count += a.numel()
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    if count == 0:
        raise ValueError("no positions to compare: give at least one batch")
    return same / count


def english_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    tokens: int = 2048,
    seq_len: int = 256,
    batch_size: int = 4,
    seed: int = 0,
    source: str = "builtin:python-docs",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """Perplexity on held-out builtin English prose: a quick check that a model still speaks English.

    SmolLM2-135M scores about 17 here; a random model tens of thousands.
    """
    from .data import Corpus, heldout_batches
    from .recipe import DataConfig

    cfg = DataConfig(sources=[source], seq_len=seq_len, heldout_fraction=0.2)
    corpus = Corpus.build(cfg, tokenizer, seed=seed, max_tokens=seq_len, heldout_tokens=tokens)
    batches = heldout_batches(corpus, seq_len, batch_size, tokens)
    return perplexity(model, batches, device=device, progress=progress)
