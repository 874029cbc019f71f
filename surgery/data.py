"""Text sources -> one token stream per split -> packed, seeded, resumable batches.

Sources (``DataSource.source``):

- ``builtin:python-stdlib``: the standard library's ``.py`` files (test suites,
  site-packages, idlelib, turtledemo, encodings tables and pydoc_data left out),
  one document per file, ids are paths relative to the stdlib root.
- ``builtin:python-docs``: ``pydoc_data.topics.topics`` (English reference prose),
  one document per topic.
- a glob of local files (``**`` recursive): ``.jsonl`` gives one document per line
  (field ``text_field``), any other file one document per file (UTF-8). Ids are
  paths relative to the glob's fixed prefix, so a moved corpus keeps its split.
- ``hf:<dataset>[/<config>]``: a Hugging Face dataset through ``datasets`` (needs the
  package and network or its local cache), one document per row.

:meth:`Corpus.build` walks each source's documents in a seeded order, routes every
document to held-out or training by a stable hash of (seed, source, document id),
so the split never depends on the token budget and the two never overlap, tokenizes
(with the tokenizer's own specials, e.g. a BOS for Llama-3/Gemma, and EOS after
every document) and stops once both budgets are met. Sources share the
budget by weight; a source that runs dry leaves its share to the others.
Tokenizing runs at roughly a million tokens a second on two cores, so nothing is
cached on disk; batches are cut from the in-memory stream.

    corpus = Corpus.build(recipe.data, tokenizer, seed=recipe.data_seed, max_tokens=65536)
    stream = BatchStream(corpus.train, seq_len=512, batch_size=4, seed=recipe.data_seed)
    batch = stream.next()                                   # (4, 512) int64
    state = stream.state_dict()                             # json-able cursor
    evals = heldout_batches(corpus, seq_len=512, batch_size=4, tokens=8192)
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import math
import os
import random
import sysconfig
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .recipe import DataConfig, DataSource

log = logging.getLogger(__name__)

BUILTIN_SOURCES = ("builtin:python-stdlib", "builtin:python-docs")
_READ_BATCH = 32  # documents tokenized per call (the Rust tokenizer parallelises within a call)
# stdlib directories that are not ordinary library code (tests, tools, data tables, the docs corpus)
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages",
     "__pycache__", "encodings", "pydoc_data", "lib2to3", "ensurepip", "__phello__"}
)


def _derive_seed(*parts: object) -> int:
    """A 63-bit integer from any parts, identical in every process (no ``hash()`` randomisation)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def is_heldout(seed: int, source: str, doc_id: str, fraction: float) -> bool:
    """Whether a document is held out: a stable hash against ``fraction``."""
    return _derive_seed("split", seed, source, doc_id) / float(1 << 63) < fraction


# --------------------------------------------------------------------------- sources


class TextSource(ABC):
    """A named collection of documents addressed by stable string ids."""

    def __init__(self, spec: DataSource) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.source

    @property
    def split_key(self) -> str:
        """What, with the seed and document ids, decides document order and split (stable across machines)."""
        return self.spec.source

    @abstractmethod
    def doc_ids(self) -> list[str]:
        """Every document id, in a fixed (sorted) order."""

    @abstractmethod
    def read(self, doc_id: str) -> str:
        """The text of one document."""


class StdlibSource(TextSource):
    """``builtin:python-stdlib``: the standard library's own ``.py`` files."""

    def __init__(self, spec: DataSource) -> None:
        super().__init__(spec)
        self.root = Path(sysconfig.get_paths()["stdlib"])

    def doc_ids(self) -> list[str]:
        ids = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(("test", "."))]
            rel = Path(dirpath).relative_to(self.root)
            ids += [(rel / f).as_posix() for f in filenames if f.endswith(".py") and not f.startswith("test")]
        return sorted(ids)

    def read(self, doc_id: str) -> str:
        return (self.root / doc_id).read_text(encoding="utf-8", errors="replace")


class DocsSource(TextSource):
    """``builtin:python-docs``: the language reference topics ``help()`` shows, one per topic."""

    def __init__(self, spec: DataSource) -> None:
        super().__init__(spec)
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions split pydoc_data out
            raise DataError(
                "builtin:python-docs needs the standard library's pydoc_data module, which this Python lacks; "
                "use builtin:python-stdlib or local files instead"
            ) from None
        self.topics: dict[str, str] = dict(topics)

    def doc_ids(self) -> list[str]:
        return sorted(self.topics)

    def read(self, doc_id: str) -> str:
        return self.topics[doc_id]


class FilesSource(TextSource):
    """A glob of local files: ``.jsonl`` one document per line, anything else one per file."""

    def __init__(self, spec: DataSource) -> None:
        super().__init__(spec)
        pattern = os.path.expanduser(spec.source)
        self.base = _glob_base(pattern)
        found = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
        # ids are paths relative to the glob's fixed prefix: moving the corpus keeps ids and split
        self.files = sorted(Path(p).relative_to(self.base).as_posix() for p in found)
        self._plain = {p for p in self.files if not p.endswith(".jsonl")}
        self._lines: dict[str, dict[int, str]] = {}
        if not self.files:
            raise DataError(
                f"data source {spec.source!r} matches no files; give builtin:python-stdlib, builtin:python-docs, "
                "hf:<dataset>, or a glob of existing .txt/.jsonl files (e.g. 'corpus/**/*.txt')"
            )

    @property
    def split_key(self) -> str:
        return "files"

    def doc_ids(self) -> list[str]:
        ids: list[str] = []
        for path in self.files:
            if path.endswith(".jsonl"):
                ids += [f"{path}:{n}" for n in self._jsonl(path)]
            else:
                ids.append(path)
        return ids

    def read(self, doc_id: str) -> str:
        if doc_id in self._plain:
            try:
                return (self.base / doc_id).read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{self.base / doc_id}: not UTF-8 text ({err.reason} at byte {err.start}); convert it or drop it from the glob") from None
        path, _, line = doc_id.rpartition(":")
        return self._jsonl(path)[int(line)]

    def _jsonl(self, path: str) -> dict[int, str]:
        """Line number (1-based) -> text of a .jsonl file's non-blank lines (read once)."""
        if path in self._lines:
            return self._lines[path]
        texts = self._lines[path] = {}
        full = self.base / path
        with open(full, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{full}:{n}: not valid JSON ({err.msg}); each line must be one JSON object") from None
                if not isinstance(record, dict) or self.spec.text_field not in record:
                    fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(
                        f"{full}:{n}: no field {self.spec.text_field!r} (found: {fields}); set text_field "
                        "on this data source to the field holding the text"
                    )
                texts[n] = str(record[self.spec.text_field])
        return texts


def _glob_base(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard (``data/**/*.txt`` -> ``data``)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if globlib.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


class HFSource(TextSource):
    """``hf:<dataset>[/<config>]`` through the ``datasets`` library."""

    def __init__(self, spec: DataSource) -> None:
        super().__init__(spec)
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"data source {spec.source!r} needs the 'datasets' package (pip install datasets) and network "
                "or a local datasets cache; offline, export the text to .jsonl files and give their glob instead"
            ) from None
        rest = spec.source.removeprefix("hf:")
        parts = rest.split("/")
        candidates = [(rest, None)] if len(parts) == 1 else [(rest, None), (parts[0], parts[1])]
        if len(parts) == 3:
            candidates = [("/".join(parts[:2]), parts[2])]
        errors = []
        for name, config in candidates:
            try:
                self.rows = datasets.load_dataset(name, config, split=spec.split)
                break
            except Exception as err:  # noqa: BLE001 - any failure: try the other reading, then report all
                errors.append(f"{name} (config {config}): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        else:
            raise DataError(
                f"cannot load data source {spec.source!r}: " + "; ".join(errors)
                + ". It needs network or a local datasets cache; offline, use local .jsonl files"
            )
        if spec.text_field not in self.rows.column_names:
            raise DataError(
                f"dataset {spec.source!r} has no column {spec.text_field!r} (columns: "
                f"{', '.join(self.rows.column_names)}); set text_field on this data source"
            )

    def doc_ids(self) -> list[str]:
        return [str(i) for i in range(len(self.rows))]

    def read(self, doc_id: str) -> str:
        return str(self.rows[int(doc_id)][self.spec.text_field])


def open_source(spec: DataSource) -> TextSource:
    """The :class:`TextSource` for one recipe data source."""
    if spec.source == "builtin:python-stdlib":
        return StdlibSource(spec)
    if spec.source == "builtin:python-docs":
        return DocsSource(spec)
    if spec.source.startswith("builtin:"):
        raise DataError(f"unknown builtin data source {spec.source!r}; builtins: {', '.join(BUILTIN_SOURCES)}")
    if spec.source.startswith("hf:"):
        return HFSource(spec)
    return FilesSource(spec)


# --------------------------------------------------------------------------- tokenizing


def encode_texts(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text; text that spells a special token (``"</s>"``) stays text.

    ``add_special_tokens=True`` adds what the tokenizer adds by default (e.g. Llama-3's
    and Gemma's BOS; nothing for SmolLM2 or the byte tokenizer).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]
    was = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return [enc.ids for enc in backend.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)]
    finally:
        backend.encode_special_tokens = was


def separator_id(tokenizer: Any) -> int | None:
    """The token placed after every document: EOS (else BOS, else none)."""
    for name in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


class _Reader:
    """Walks one source's documents in seeded order, splitting them into training and held-out tokens."""

    def __init__(self, source: TextSource, tokenizer: Any, seed: int, fraction: float) -> None:
        self.source, self.tokenizer, self.seed, self.fraction = source, tokenizer, seed, fraction
        ids = source.doc_ids()
        if not ids:
            raise DataError(f"data source {source.name!r} has no documents")
        random.Random(_derive_seed("order", seed, source.split_key)).shuffle(ids)
        self.order, self.next_doc = ids, 0
        self.sep = separator_id(tokenizer)
        splits = ("train", "heldout")
        # per split: (doc id, tokens) read but not handed out yet, and their token count
        self.pending: dict[str, deque[tuple[str, list[int]]]] = {s: deque() for s in splits}
        self.available: dict[str, int] = {s: 0 for s in splits}
        self.taken: dict[str, list[list[int]]] = {s: [] for s in splits}  # handed-out pieces, in order
        self.docs: dict[str, list[str]] = {s: [] for s in splits}  # ids of documents (partly) handed out
        self.documents_read = 0

    @property
    def exhausted(self) -> bool:
        return self.next_doc >= len(self.order)

    def dry(self, split: str) -> bool:
        """Nothing more to give for ``split``."""
        return self.exhausted and self.available[split] == 0

    def taken_count(self, split: str) -> int:
        return sum(map(len, self.taken[split]))

    def _read_more(self) -> None:
        batch = self.order[self.next_doc : self.next_doc + _READ_BATCH]
        self.next_doc += len(batch)
        texts = [self.source.read(doc_id) for doc_id in batch]
        for doc_id, text, ids in zip(batch, texts, encode_texts(self.tokenizer, texts, add_special_tokens=True)):
            if not text.strip():
                continue
            self.documents_read += 1
            split = "heldout" if is_heldout(self.seed, self.source.split_key, doc_id, self.fraction) else "train"
            tokens = ids + ([self.sep] if self.sep is not None and ids[-1:] != [self.sep] else [])
            self.pending[split].append((doc_id, tokens))
            self.available[split] += len(tokens)

    def take(self, split: str, want: float) -> int:
        """Hand out up to ``want`` more tokens of ``split`` (``inf``: all); returns how many."""
        while self.available[split] < want and not self.exhausted:
            self._read_more()
        count = 0
        queue = self.pending[split]
        while queue and count < want:
            doc_id, tokens = queue[0]
            room = int(min(len(tokens), want - count))
            self.taken[split].append(tokens[:room])
            if not self.docs[split] or self.docs[split][-1] != doc_id:
                self.docs[split].append(doc_id)
            count += room
            if room == len(tokens):
                queue.popleft()
            else:
                queue[0] = (doc_id, tokens[room:])
        self.available[split] -= count
        return count


# --------------------------------------------------------------------------- the corpus


@dataclass
class Corpus:
    """Training and held-out tokens (1-D int64), with the documents they came from."""

    train: torch.Tensor  # (N_train,) int64
    heldout: torch.Tensor  # (N_heldout,) int64
    train_docs: list[str]  # 'source::doc_id', in stream order
    heldout_docs: list[str]
    sources: list[dict[str, Any]] = field(default_factory=list)  # per source: name, docs, tokens, exhausted
    seed: int = 0

    @classmethod
    def build(
        cls,
        cfg: DataConfig,
        tokenizer: Any,
        *,
        seed: int,
        max_tokens: int | None = None,
        heldout_tokens: int | None = None,
        progress: bool = False,
    ) -> Corpus:
        """Tokenize ``cfg.sources`` up to ``max_tokens`` training and ``heldout_tokens`` held-out tokens.

        ``None`` budgets: training takes everything; held-out defaults to the held-out
        fraction's share of ``max_tokens`` (at least one ``cfg.seq_len`` sequence), or
        everything when ``max_tokens`` is ``None`` too.
        """
        if heldout_tokens is None and max_tokens is not None:
            share = cfg.heldout_fraction / (1 - cfg.heldout_fraction)
            heldout_tokens = max(math.ceil(max_tokens * share), cfg.seq_len)
        targets = {"train": max_tokens, "heldout": heldout_tokens}
        readers = [_Reader(open_source(s), tokenizer, seed, cfg.heldout_fraction) for s in cfg.sources]
        weights = [s.weight for s in cfg.sources]
        bar = _progress(progress, max_tokens, heldout_tokens)
        for split, target in targets.items():
            _fill(readers, weights, split, target, bar)
        if bar is not None:
            bar.close()
        corpus = cls._assemble(readers, seed)
        corpus._check(cfg, max_tokens)
        return corpus

    @classmethod
    def for_recipe(cls, recipe: Any, tokenizer: Any, *, progress: bool = False) -> Corpus:
        """The corpus a recipe needs: every enabled stage's budget plus the evaluation tokens."""
        return cls.build(
            recipe.data,
            tokenizer,
            seed=recipe.data_seed,
            max_tokens=recipe.data.max_tokens or max(train_tokens_needed(recipe), recipe.data.seq_len),
            heldout_tokens=heldout_tokens_needed(recipe),
            progress=progress,
        )

    @classmethod
    def _assemble(cls, readers: list[_Reader], seed: int) -> Corpus:
        def cat(split: str) -> torch.Tensor:
            return torch.tensor([t for r in readers for piece in r.taken[split] for t in piece], dtype=torch.long)

        def docs(split: str) -> list[str]:
            return [f"{r.source.name}::{d}" for r in readers for d in r.docs[split]]

        stats = [
            {
                "source": r.source.name,
                "documents_read": r.documents_read,
                "train_tokens": r.taken_count("train"),
                "heldout_tokens": r.taken_count("heldout"),
                "train_documents": len(r.docs["train"]),
                "heldout_documents": len(r.docs["heldout"]),
                "exhausted": r.dry("train"),
            }
            for r in readers
        ]
        return cls(cat("train"), cat("heldout"), docs("train"), docs("heldout"), stats, seed)

    def _check(self, cfg: DataConfig, max_tokens: int | None) -> None:
        for stat in self.sources:
            if stat["documents_read"] == 0 and stat["exhausted"]:
                raise DataError(f"data source {stat['source']!r} yields no text (all its documents are empty)")
        if self.train.numel() < cfg.seq_len:
            raise DataError(
                f"the data yields {self.train.numel()} training tokens, fewer than one sequence of "
                f"data.seq_len={cfg.seq_len}; add documents or lower seq_len"
            )
        if self.heldout.numel() == 0:
            raise DataError(
                f"no document was held out for evaluation (heldout_fraction={cfg.heldout_fraction}, "
                f"{sum(s['documents_read'] for s in self.sources)} documents); raise data.heldout_fraction or add documents"
            )
        if max_tokens is not None and self.train.numel() < max_tokens:
            log.warning(
                "data: only %d training tokens for a budget of %d; batches will repeat (%.1f epochs)",
                self.train.numel(), max_tokens, max_tokens / self.train.numel(),
            )

    def summary(self) -> dict[str, Any]:
        """JSON-able description for reports and provenance."""
        return {
            "seed": self.seed,
            "train_tokens": self.train.numel(),
            "heldout_tokens": self.heldout.numel(),
            "sources": self.sources,
        }


def _progress(enabled: bool, train: int | None, heldout: int | None) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = None if train is None or heldout is None else train + heldout
    return tqdm(total=total, unit="tok", desc="tokenizing", unit_scale=True)


def _fill(readers: list[_Reader], weights: list[float], split: str, target: int | None, bar: Any) -> None:
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


# --------------------------------------------------------------------------- batches


def tokens_fingerprint(tokens: torch.Tensor) -> str:
    """Short content hash of a token tensor (checked when a cursor is restored)."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


class BatchStream:
    """Fixed-length sequences cut from a token stream, in a seeded order, forever.

    The tokens are cut into ``len(tokens) // seq_len`` chunks (the tail is unused);
    each epoch visits every chunk once in an order drawn from ``(seed, epoch)``.
    A batch may straddle two epochs. ``state_dict()`` is the cursor; a stream
    restored with ``load_state_dict`` yields exactly the batch that would have come next.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        self.n_chunks = tokens.numel() // seq_len
        if self.n_chunks == 0:
            raise DataError(f"{tokens.numel()} tokens make no sequence of seq_len={seq_len}; add data or lower seq_len")
        self.chunks = tokens[: self.n_chunks * seq_len].to(torch.long).view(self.n_chunks, seq_len)  # (n_chunks, L)
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.epoch, self.position, self.tokens_served = 0, 0, 0
        self._order: torch.Tensor | None = None
        self._fingerprint: str | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(_derive_seed("batches", self.seed, self.epoch))
            self._order = torch.randperm(self.n_chunks, generator=gen)
        return self._order

    def next(self) -> torch.Tensor:
        """The next batch, ``(batch_size, seq_len)`` int64."""
        picks = []
        need = self.batch_size
        while need:
            take = min(need, self.n_chunks - self.position)
            picks.append(self._epoch_order()[self.position : self.position + take])
            self.position += take
            need -= take
            if self.position == self.n_chunks:  # next epoch, new order
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        batch = self.chunks[torch.cat(picks)]  # (batch_size, L)
        self.tokens_served += batch.numel()
        return batch

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


def heldout_batches(corpus: Corpus, seq_len: int, batch_size: int, tokens: int) -> list[torch.Tensor]:
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
    return [seqs[i : i + batch_size].clone() for i in range(0, n, batch_size)]


# --------------------------------------------------------------------------- recipe helpers


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


__all__: Sequence[str] = [
    "BUILTIN_SOURCES",
    "BatchStream",
    "Corpus",
    "TextSource",
    "data_config_from_cli",
    "encode_texts",
    "heldout_batches",
    "heldout_tokens_needed",
    "is_heldout",
    "open_source",
    "tokens_needed",
    "train_tokens_needed",
]
