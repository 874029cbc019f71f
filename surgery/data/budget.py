"""Recipe helpers: the ``--data`` flag and the token budgets a recipe needs."""

from __future__ import annotations

from collections.abc import Callable
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


def check_repeats(recipe: Any, train_tokens: int, estimate: Callable[[], str] | None = None) -> None:
    """Refuse a plan whose stage budget needs more than ``data.max_epochs`` passes over ``train_tokens``.

    Each stage cuts the training tokens into sequences of its own length and passes over them in
    turn (:class:`~surgery.data.BatchStream`). ``estimate()``, called only when refusing, says how
    long the plan would take.
    """
    limit = recipe.data.max_epochs
    worst: tuple[int, float, int] | None = None
    for i in (1, 2, 3):
        cfg = recipe.stage(i)
        usable = train_tokens // recipe.seq_len(i) * recipe.seq_len(i)
        if not cfg.enabled or usable == 0:
            continue
        epochs = cfg.tokens / usable
        if epochs > limit and (worst is None or epochs > worst[1]):
            worst = (i, epochs, usable)
    if worst is None:
        return
    i, epochs, usable = worst
    took = f"; the plan would take {estimate()}" if estimate is not None else ""
    raise DataError(
        f"stages.stage{i}.tokens ({recipe.stage(i).tokens:,}) needs {epochs:,.3g} passes over the {usable:,} "
        f"training tokens the data holds, more than data.max_epochs ({limit:g}){took}. Lower the stage budgets, "
        "add data (data.sources), or raise data.max_epochs to repeat the data on purpose"
    )
