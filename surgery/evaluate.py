"""Held-out metrics, one code path for teachers and students.

``perplexity`` is exp of the mean next-token negative log-likelihood over every
predicted position of the batches (``L - 1`` per sequence). ``top1_agreement`` is
the fraction of positions where two models' most likely next tokens agree.

    batches = heldout_batches(corpus, seq_len=512, batch_size=4, tokens=8192)
    perplexity(teacher.model, batches)                     # e.g. 17.3
    top1_agreement(teacher.model, student, batches)        # e.g. 0.62
    english_perplexity(teacher.model, teacher.tokenizer)   # sanity check on builtin English prose
    evaluate_reference("runs/tiny", EvalOptions(data="builtin:python-docs"))   # ``surgery eval``: a dict
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["english_perplexity", "evaluate_reference", "heldout_for_eval", "mean_nll", "perplexity", "top1_agreement"]


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


# --------------------------------------------------------------------------- surgery eval

EVAL_SEED = 0  # the document split of `surgery eval`: the same for every model, so numbers compare


def heldout_for_eval(tokenizer: Any, opts: Any) -> tuple[list[torch.Tensor], Any]:
    """Held-out batches for ``surgery eval`` (``opts``: :class:`~surgery.options.EvalOptions`) and their DataConfig.

    Documents are split with seed :data:`EVAL_SEED` and the default held-out fraction, whatever
    the model, so a teacher and its students are scored on the same text.
    """
    from .data import Corpus, data_config_from_cli, heldout_batches
    from .errors import DataError

    cfg = data_config_from_cli(opts.data, opts.seq_len)
    try:
        corpus = Corpus.build(cfg, tokenizer, seed=EVAL_SEED, max_tokens=opts.seq_len, heldout_tokens=opts.tokens)
    except DataError as err:  # its advice names recipe fields; here the flags are the fix
        reason = str(err).split(";")[0]
        raise DataError(f"--data {opts.data} is too small to evaluate with --seq-len {opts.seq_len} ({reason}); "
                        "pass a smaller --seq-len, or --data with more documents") from None
    held = corpus.heldout.numel()
    if held < opts.seq_len:
        fix = f"pass --seq-len {held} or less (the quick fix)" if held >= 8 else "add documents"
        raise DataError(f"only {held} held-out tokens in --data {opts.data} (documents held out with the fixed "
                        f"fraction {cfg.heldout_fraction}), fewer than one sequence of --seq-len {opts.seq_len}: "
                        f"{fix}, or give --data with more documents")
    return heldout_batches(corpus, opts.seq_len, opts.batch_size, opts.tokens), cfg


def _split_disjoint(path: Any, cfg: Any) -> bool | None:
    """Whether the eval's held-out documents were held out in the student's training too (None: unknown).

    Same seed and an eval fraction no larger than training's: the eval documents are a subset of
    training's held-out documents (:func:`surgery.data.is_heldout` thresholds one hash).
    """
    from pathlib import Path

    import yaml

    recipe = Path(path) / "recipe.resolved.yaml"
    if not recipe.is_file():
        return None
    try:
        raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        data = raw["data"]
        seed = data.get("seed") if data.get("seed") is not None else raw.get("seed", 0)
        trained = {s["source"] if isinstance(s, dict) else s for s in data["sources"]}
        fraction = float(data["heldout_fraction"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    if not trained & {s.source for s in cfg.sources}:
        return True
    return seed == EVAL_SEED and cfg.heldout_fraction <= fraction


def evaluate_reference(model_ref: str, opts: Any = None) -> dict[str, Any]:
    """``surgery eval``: held-out perplexity of a teacher reference or a student directory (one code path).

    Returns ``{"model", "kind", "data", "tokens", "seq_len", "perplexity", "nll", ...}``; ``tokens``
    counts the tokens fed, ``predicted`` the positions scored (``seq_len - 1`` per sequence). For a
    student, ``heldout_disjoint_from_training`` says whether the eval text was also held out in its
    training (False: a warning is logged; numbers may be optimistic).
    """
    import logging

    from .options import EvalOptions
    from .runtime import resolve_device
    from .student import load_model_ref

    opts = opts or EvalOptions()
    device = resolve_device(opts.device)
    loaded = load_model_ref(model_ref, device=device)
    batches, cfg = heldout_for_eval(loaded.tokenizer, opts)
    nll, predicted = mean_nll(loaded.model, batches, device=device)
    result: dict[str, Any] = {
        "model": model_ref,
        "kind": loaded.kind,
        "data": opts.data,
        "tokens": sum(b.numel() for b in batches),
        "seq_len": opts.seq_len,
        "perplexity": math.exp(nll),
        "nll": nll,
        "predicted": predicted,
        "device": str(device),
        "split_seed": EVAL_SEED,
        "heldout_fraction": cfg.heldout_fraction,
    }
    if loaded.kind == "student":
        disjoint = _split_disjoint(model_ref, cfg)
        result["heldout_disjoint_from_training"] = disjoint
        if disjoint is False:
            logging.getLogger("surgery").warning(
                "surgery eval: the student was trained with another data split (seed or held-out fraction); some "
                "evaluation documents may have been trained on. Evaluate on other --data for a clean number."
            )
    return result
