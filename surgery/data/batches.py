"""Packed, seeded, resumable batches cut from a token stream (in memory or over a file)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import DataError
from .sources import derive_seed
from .tokens import tokens_fingerprint

log = logging.getLogger(__name__)


class BatchStream:
    """Fixed-length sequences cut from a token stream, in a seeded order, forever.

    The tokens are cut into ``len(tokens) // seq_len`` chunks (the tail is unused);
    each epoch visits every chunk once in an order drawn from ``(seed, epoch)``.
    A batch may straddle two epochs. ``state_dict()`` is the cursor; a stream
    restored with ``load_state_dict`` yields exactly the batch that would have come next.
    Only each batch's rows are read and converted to int64, so ``tokens`` may be a
    uint16/int32 tensor over an on-disk file far larger than memory.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int,
                 fingerprint: str | None = None) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        self.n_chunks = tokens.numel() // seq_len
        if self.n_chunks == 0:
            raise DataError(f"{tokens.numel()} tokens make no sequence of seq_len={seq_len}; add data or lower seq_len")
        self.chunks = tokens[: self.n_chunks * seq_len].reshape(self.n_chunks, seq_len)  # (n_chunks, L), a view
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.epoch, self.position, self.tokens_served = 0, 0, 0
        self._order: torch.Tensor | None = None
        # an on-disk corpus carries its fingerprint (hashing billions of tokens takes a while)
        self._fingerprint = fingerprint or getattr(tokens, "_surgery_fingerprint", None)

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(derive_seed("batches", self.seed, self.epoch))
            self._order = torch.randperm(self.n_chunks, generator=gen)
        return self._order

    def _advance(self, rows: int, read: bool) -> list[torch.Tensor]:
        """Move the cursor ``rows`` chunks on; with ``read``, the chunk indices passed over."""
        picks = []
        while rows:
            take = min(rows, self.n_chunks - self.position)
            if read:
                picks.append(self._epoch_order()[self.position : self.position + take])
            self.position += take
            rows -= take
            if self.position == self.n_chunks:  # next epoch, new order
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return picks

    def next(self) -> torch.Tensor:
        """The next batch, ``(batch_size, seq_len)`` int64."""
        batch = self.chunks[torch.cat(self._advance(self.batch_size, read=True))].to(torch.long)  # (batch_size, L)
        self.tokens_served += batch.numel()
        return batch

    def skip(self, n_batches: int) -> None:
        """Advance the cursor past ``n_batches`` batches without reading them (other ranks' share)."""
        self._advance(n_batches * self.batch_size, read=False)
        self.tokens_served += n_batches * self.batch_size * self.seq_len

    __next__ = next

    def __iter__(self) -> BatchStream:
        return self

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = tokens_fingerprint(self.tokens)
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """JSON-able cursor."""
        return {
            "version": 1,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_tokens": self.tokens.numel(),
            "fingerprint": self.fingerprint,
            "epoch": self.epoch,
            "position": self.position,
            "tokens_served": self.tokens_served,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the data, seed and sequence length must be the same."""
        current = self.state_dict()
        for key in ("seed", "seq_len", "n_tokens", "fingerprint"):
            mine = current[key]
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the data stream: {key} was {state.get(key)!r} at the checkpoint and is {mine!r} now; "
                    "resume with the same data, seed and seq_len, or start the run afresh"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.tokens_served = int(state["tokens_served"])
        self._order = None


def heldout_batches(corpus: Any, seq_len: int, batch_size: int, tokens: int) -> list[torch.Tensor]:
    """The first ``tokens // seq_len`` (at least one) held-out sequences, in batches of ``batch_size``.

    Deterministic: the same corpus always gives the same batches. Each is ``(b, seq_len)``
    int64 with ``b <= batch_size`` (only the last may be smaller).
    """
    available = corpus.heldout.numel() // seq_len
    if available == 0:
        raise DataError(
            f"only {corpus.heldout.numel()} held-out tokens, fewer than one sequence of {seq_len}; "
            "raise data.heldout_fraction, add documents or lower the evaluation seq_len"
        )
    wanted = max(1, tokens // seq_len)
    if wanted > available:
        log.warning("data: %d held-out tokens asked for, only %d available", wanted * seq_len, available * seq_len)
    n = min(wanted, available)
    seqs = corpus.heldout[: n * seq_len].view(n, seq_len)  # (n, L)
    return [seqs[i : i + batch_size].to(torch.long, copy=True) for i in range(0, n, batch_size)]
