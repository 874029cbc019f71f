"""Recipe helpers: the ``--data`` flag and the token budgets a recipe needs."""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from ..recipe import DataConfig


def data_config_from_cli(spec: str, seq_len: int) -> DataConfig:
    """``--data`` flag -> DataConfig: comma-separated sources, each optionally ``=weight``.

    ``builtin:python-docs``, ``builtin:python-stdlib=3,builtin:python-docs=1``, ``'corpus/*.jsonl'``.
    """
    sources = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        source, _, weight = part.rpartition("=")
        try:
            sources.append({"source": source, "weight": float(weight)} if source else {"source": part})
        except ValueError:  # '=' belonged to the path
            sources.append({"source": part})
    if not sources:
        raise DataError(f"--data {spec!r} names no source; e.g. --data builtin:python-docs")
    try:
        return DataConfig(sources=sources, seq_len=seq_len)
    except ValueError as err:
        raise DataError(f"--data {spec!r}: {err}") from None


def train_tokens_needed(recipe: Any) -> int:
    """Training tokens of every enabled stage together (the stream serves the stages in turn)."""
    return sum(recipe.stage(i).tokens for i in (1, 2, 3) if recipe.stage(i).enabled)


def heldout_tokens_needed(recipe: Any) -> int:
    """Held-out tokens the evaluations need (the same held-out batches are reused before/after each stage)."""
    verify = recipe.verify
    seq_len = verify.seq_len or recipe.data.seq_len
    return max(verify.tokens, verify.stage1_tokens or 0, seq_len)


def tokens_needed(recipe: Any) -> int:
    """All tokens a recipe consumes: enabled stage budgets plus held-out verification."""
    return train_tokens_needed(recipe) + heldout_tokens_needed(recipe)
