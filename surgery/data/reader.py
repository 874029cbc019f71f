"""Tokenizing sources into a sink: seeded document order, held-out routing, weighted shares.

Each source gets a :class:`Reader`; :func:`fill` hands each its weighted share of a
split's budget and re-shares what dry sources could not give. Readers pass the pieces
they hand out to a sink (:class:`MemorySink` here, ``DiskSink`` in :mod:`.store`),
keyed by (reader index, split); joining a split's pieces in reader order gives the stream.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import DataError
from .sources import Document, TextSource, is_heldout
from .tokens import encode_texts, separator_id

SPLITS = ("train", "heldout")


class Sink(Protocol):
    def add(self, reader: int, split: str, doc: str, tokens: np.ndarray) -> None:
        """Append a piece of document ``doc`` (int64 ids) to reader ``reader``'s ``split``."""


class MemorySink:
    """Pieces kept in memory; :meth:`tokens` joins a split into one int64 tensor."""

    def __init__(self) -> None:
        self.pieces: dict[tuple[int, str], list[np.ndarray]] = {}
        self.docs: dict[tuple[int, str], list[str]] = {}

    def add(self, reader: int, split: str, doc: str, tokens: np.ndarray) -> None:
        self.pieces.setdefault((reader, split), []).append(tokens)
        docs = self.docs.setdefault((reader, split), [])
        if not docs or docs[-1] != doc:
            docs.append(doc)

    def tokens(self, split: str, readers: int) -> torch.Tensor:
        parts = [p for r in range(readers) for p in self.pieces.get((r, split), [])]
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)

    def doc_list(self, split: str, readers: int) -> list[str]:
        return [d for r in range(readers) for d in self.docs.get((r, split), [])]


class Reader:
    """Walks one source's documents in seeded order, splitting them into training and held-out tokens.

    ``targets`` (per split, ``None``: no limit) bound what is kept waiting: tokens of a split
    beyond its whole budget are never handed out, so they are dropped as they are read.
    """

    def __init__(self, index: int, source: TextSource, tokenizer: Any, seed: int, fraction: float,
                 targets: dict[str, int | None], sink: Sink) -> None:
        self.index, self.source, self.tokenizer, self.seed, self.fraction = index, source, tokenizer, seed, fraction
        self.sink = sink
        self.caps = {s: math.inf if t is None else t for s, t in targets.items()}
        self._docs = source.documents(seed)
        self._head: Document | None = next(self._docs, None)  # one ahead: exhaustion is known before asking
        if self._head is None:
            raise DataError(f"data source {source.name!r} has no documents")
        self.sep = separator_id(tokenizer)
        # per split: (doc id, tokens) read but not handed out yet, and their token count
        self.pending: dict[str, deque[tuple[str, np.ndarray]]] = {s: deque() for s in SPLITS}
        self.available: dict[str, int] = {s: 0 for s in SPLITS}
        self.taken: dict[str, int] = {s: 0 for s in SPLITS}
        self.documents_read = 0

    @property
    def exhausted(self) -> bool:
        return self._head is None

    def dry(self, split: str) -> bool:
        """Nothing more to give for ``split``."""
        return self.exhausted and self.available[split] == 0

    def _read_more(self) -> None:
        batch: list[Document] = []
        while self._head is not None and len(batch) < self.source.read_batch:
            batch.append(self._head)
            self._head = next(self._docs, None)
        texts = [read() for _, read in batch]
        splits = ["heldout" if is_heldout(self.seed, self.source.split_key, doc_id, self.fraction) else "train"
                  for doc_id, _ in batch]
        # a split whose whole budget is met drops its documents: don't tokenize them (the held-out
        # tail of a large training budget is mostly training documents read past)
        full = {s: self.taken[s] + self.available[s] >= self.caps[s] for s in SPLITS}
        wanted = [i for i, (text, split) in enumerate(zip(texts, splits)) if text.strip() and not full[split]]
        ids_of = encode_texts(self.tokenizer, [texts[i] for i in wanted], add_special_tokens=True) if wanted else []
        encoded = dict(zip(wanted, ids_of))
        for i, ((doc_id, _), text, split) in enumerate(zip(batch, texts, splits)):
            if not text.strip():
                continue
            self.documents_read += 1
            if self.taken[split] + self.available[split] >= self.caps[split]:
                continue  # beyond the split's whole budget: never handed out
            ids = encoded[i]
            if self.sep is not None and ids[-1:] != [self.sep]:
                ids.append(self.sep)
            self.pending[split].append((doc_id, np.asarray(ids, dtype=np.int64)))
            self.available[split] += len(ids)

    def take(self, split: str, want: float) -> int:
        """Hand out up to ``want`` more tokens of ``split`` (``inf``: all); returns how many."""
        while self.available[split] < want and not self.exhausted:
            self._read_more()
        count = 0
        queue = self.pending[split]
        while queue and count < want:
            doc_id, tokens = queue[0]
            room = int(min(len(tokens), want - count))
            self.sink.add(self.index, split, f"{self.source.name}::{doc_id}", tokens[:room])
            count += room
            if room == len(tokens):
                queue.popleft()
            else:
                queue[0] = (doc_id, tokens[room:])
        self.available[split] -= count
        self.taken[split] += count
        return count


def fill(readers: list[Reader], weights: list[float], split: str, target: int | None, bar: Any) -> None:
    """Give each reader its weighted share of ``target``; re-share what dry sources could not give."""
    remaining = math.inf if target is None else target
    active = list(range(len(readers)))
    while remaining > 0 and active:
        total_w = sum(weights[i] for i in active)
        shares = {i: remaining * weights[i] / total_w for i in active}
        if target is not None:  # whole-token shares that add up to exactly `remaining`
            whole = {i: math.floor(v) for i, v in shares.items()}
            short = int(remaining) - sum(whole.values())
            for i in sorted(active, key=lambda i: whole[i] - shares[i])[:short]:
                whole[i] += 1
            shares = {i: float(v) for i, v in whole.items()}
        for i in active:
            moved = readers[i].take(split, shares[i])
            remaining -= moved
            if bar is not None:
                bar.update(moved)
        active = [i for i in active if not readers[i].dry(split)]


def tokenize(sources: list[TextSource], weights: list[float], tokenizer: Any, *, seed: int, fraction: float,
             targets: dict[str, int | None], sink: Sink, progress: bool) -> list[dict[str, Any]]:
    """Fill ``sink`` with every split's budget from ``sources``; per-source statistics (without document counts)."""
    readers = [Reader(i, s, tokenizer, seed, fraction, targets, sink) for i, s in enumerate(sources)]
    bar = _progress(progress, targets["train"], targets["heldout"])
    try:
        for split in SPLITS:
            fill(readers, weights, split, targets[split], bar)
    finally:
        if bar is not None:
            bar.close()
    return [
        {
            "source": r.source.name,
            "documents_read": r.documents_read,
            "train_tokens": r.taken["train"],
            "heldout_tokens": r.taken["heldout"],
            "exhausted": r.dry("train"),
        }
        for r in readers
    ]


def _progress(enabled: bool, train: int | None, heldout: int | None) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = None if train is None or heldout is None else train + heldout
    return tqdm(total=total, unit="tok", desc="tokenizing", unit_scale=True)
