"""The corpus: training and held-out token streams, in memory or over an on-disk file."""

from __future__ import annotations

import errno
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import DataError
from ..recipe import DataConfig
from .budget import heldout_tokens_needed, train_tokens_needed
from .reader import SPLITS, MemorySink, tokenize
from .sources import TextSource, open_source
from .store import (
    FORMAT,
    DiskSink,
    DocList,
    cache_key,
    commit,
    data_cache_root,
    discard_broken,
    open_tokens,
    read_meta,
    scratch_dir,
)
from .tokens import token_dtype, tokenizer_fingerprint

log = logging.getLogger(__name__)

DISK_THRESHOLD = 1 << 26  # tokens (64 Mi, 512 MiB as int64): larger budgets are tokenized to disk
Storage = Literal["auto", "memory", "disk"]


@dataclass
class Corpus:
    """Training and held-out tokens (1-D), with the documents they came from.

    In memory the tensors are int64; on disk (:attr:`path` set) they are uint16 or int32
    tensors over the files, which :class:`~surgery.data.BatchStream` and
    :func:`~surgery.data.heldout_batches` index without reading them whole.
    """

    train: torch.Tensor  # (N_train,)
    heldout: torch.Tensor  # (N_heldout,)
    train_docs: Sequence[str]  # 'source::doc_id', in stream order
    heldout_docs: Sequence[str]
    sources: list[dict[str, Any]] = field(default_factory=list)  # per source: name, docs, tokens, exhausted
    seed: int = 0
    path: Path | None = None  # the on-disk corpus directory, when the tokens live there

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
        storage: Storage = "auto",
        sampler: Any = None,
    ) -> Corpus:
        """Tokenize ``cfg.sources`` up to ``max_tokens`` training and ``heldout_tokens`` held-out tokens.

        ``None`` budgets: training takes everything; held-out defaults to the held-out
        fraction's share of ``max_tokens`` (at least one ``cfg.seq_len`` sequence), or
        everything when ``max_tokens`` is ``None`` too.

        ``storage``: ``"memory"``, ``"disk"`` (a token file under ``cache_dir()/data``, reused
        by the next build with the same sources, tokenizer, seed and budgets), or ``"auto"``:
        disk for streamed sources and for budgets above :data:`DISK_THRESHOLD` tokens.
        ``sampler``: a :class:`~surgery.data.teacher_samples.TeacherSampler`, for ``builtin:teacher-samples``.
        """
        if heldout_tokens is None and max_tokens is not None:
            share = cfg.heldout_fraction / (1 - cfg.heldout_fraction)
            heldout_tokens = max(math.ceil(max_tokens * share), cfg.seq_len)
        targets = {"train": max_tokens, "heldout": heldout_tokens}
        sources = [open_source(s, sampler) for s in cfg.sources]
        if _on_disk(storage, sources, targets):
            return cls._build_on_disk(cfg, sources, tokenizer, seed, targets, progress)
        sink = MemorySink()
        stats = tokenize(sources, [s.weight for s in cfg.sources], tokenizer, seed=seed,
                         fraction=cfg.heldout_fraction, targets=targets, sink=sink, progress=progress)
        n = len(sources)
        docs = {s: sink.doc_list(s, n) for s in SPLITS}
        counts = {s: [len(sink.docs.get((i, s), [])) for i in range(n)] for s in SPLITS}
        corpus = cls(sink.tokens("train", n), sink.tokens("heldout", n), docs["train"], docs["heldout"],
                     _with_doc_counts(stats, counts), seed)
        _check(corpus.sources, corpus.train.numel(), corpus.heldout.numel(), cfg, max_tokens)
        return corpus

    @classmethod
    def _build_on_disk(cls, cfg: DataConfig, sources: list[TextSource], tokenizer: Any, seed: int,
                       targets: dict[str, int | None], progress: bool) -> Corpus:
        fields = {
            "format": FORMAT,
            "sources": [{**s.spec.model_dump(), "identity": s.identity()} for s in sources],
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "seed": seed,
            "max_tokens": targets["train"],
            "heldout_tokens": targets["heldout"],
            "heldout_fraction": cfg.heldout_fraction,
        }
        key = cache_key(fields)
        final = data_cache_root() / key
        if read_meta(final, key) is None:
            discard_broken(final, key)
            _write_on_disk(final, fields, cfg, sources, tokenizer, seed, targets, progress)
        else:
            log.info("data: reusing the tokens in %s", final)
        meta = read_meta(final, key)
        if meta is None:
            raise DataError(f"the corpus written to {final} cannot be read back; delete it and run again")
        return cls(
            open_tokens(final, "train", meta), open_tokens(final, "heldout", meta),
            DocList(final / "train_docs.jsonl", meta["train"]["documents"]),
            DocList(final / "heldout_docs.jsonl", meta["heldout"]["documents"]),
            meta["sources"], seed, final,
        )

    @classmethod
    def for_recipe(cls, recipe: Any, tokenizer: Any, *, progress: bool = False, sampler: Any = None) -> Corpus:
        """The corpus a recipe needs: every enabled stage's budget plus the evaluation tokens."""
        return cls.build(
            recipe.data,
            tokenizer,
            seed=recipe.data_seed,
            max_tokens=recipe.data.max_tokens or max(train_tokens_needed(recipe), recipe.data.seq_len),
            heldout_tokens=heldout_tokens_needed(recipe),
            progress=progress,
            sampler=sampler,
        )

    def summary(self) -> dict[str, Any]:
        """JSON-able description for reports and provenance."""
        out = {
            "seed": self.seed,
            "train_tokens": self.train.numel(),
            "heldout_tokens": self.heldout.numel(),
            "sources": self.sources,
        }
        if self.path is not None:
            out["path"] = str(self.path)
        return out


def _write_on_disk(final: Path, fields: dict[str, Any], cfg: DataConfig, sources: list[TextSource], tokenizer: Any,
                   seed: int, targets: dict[str, int | None], progress: bool) -> None:
    """Tokenize into a scratch directory beside ``final`` and rename it to ``final`` once complete."""
    dtype = token_dtype(tokenizer)
    budget = None if None in targets.values() else sum(targets.values())  # type: ignore[arg-type]
    log.info("data: tokenizing %s tokens into %s", "all" if budget is None else budget, final)
    start, tmp = time.monotonic(), None
    try:
        tmp = scratch_dir(final.parent, final.name)
        sink = DiskSink(tmp, dtype)
        try:
            stats = tokenize(sources, [s.weight for s in cfg.sources], tokenizer, seed=seed,
                             fraction=cfg.heldout_fraction, targets=targets, sink=sink, progress=progress)
        finally:
            sink.close()
        splits = {s: sink.finish(s, len(sources)) for s in SPLITS}
        counts = {s: [sink.doc_counts.get((i, s), 0) for i in range(len(sources))] for s in SPLITS}
        stats = _with_doc_counts(stats, counts)
        _check(stats, splits["train"]["tokens"], splits["heldout"]["tokens"], cfg, targets["train"])
        seconds = time.monotonic() - start
        meta = {"format": FORMAT, "key": final.name, "fields": fields, "dtype": dtype.str, **splits,
                "sources": stats, "seconds": round(seconds, 2)}
        commit(tmp, final, meta)
    except OSError as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not _writing_failed(err, final.parent):
            raise
        need = "" if budget is None else f" (about {budget * dtype.itemsize / 1e9:.2f} GB needed)"
        raise DataError(
            f"cannot write the token cache in {final.parent}: {err}; free space there{need} or set "
            "SURGERY_CACHE to a writable directory with room, then run again"
        ) from err
    except BaseException:  # interrupted or failed: leave nothing half-written behind
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = splits["train"]["tokens"] + splits["heldout"]["tokens"]
    log.info("data: %d tokens tokenized into %s (%.0f tokens/s)", total, final, total / max(seconds, 1e-9))


def _writing_failed(err: OSError, root: Path) -> bool:
    """Whether ``err`` came from writing the cache (full or read-only disk, or a path under ``root``)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    return any(str(name).startswith(str(root)) for name in (err.filename, err.filename2) if name)


def _on_disk(storage: Storage, sources: list[TextSource], targets: dict[str, int | None]) -> bool:
    if storage not in ("auto", "memory", "disk"):
        raise DataError(f"storage must be 'auto', 'memory' or 'disk', not {storage!r}")
    if storage != "auto":
        return storage == "disk"
    if any(s.streamed for s in sources):
        return True
    train, heldout = targets["train"], targets["heldout"]
    return train is not None and heldout is not None and train + heldout > DISK_THRESHOLD


def _with_doc_counts(stats: list[dict[str, Any]], counts: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Per-source statistics in their report order, with the documents each split took."""
    return [
        {
            "source": s["source"],
            "documents_read": s["documents_read"],
            "train_tokens": s["train_tokens"],
            "heldout_tokens": s["heldout_tokens"],
            "train_documents": counts["train"][i],
            "heldout_documents": counts["heldout"][i],
            "exhausted": s["exhausted"],
        }
        for i, s in enumerate(stats)
    ]


def _check(stats: list[dict[str, Any]], n_train: int, n_heldout: int, cfg: DataConfig, max_tokens: int | None) -> None:
    for stat in stats:
        if stat["documents_read"] == 0 and stat["exhausted"]:
            raise DataError(f"data source {stat['source']!r} yields no text (all its documents are empty)")
    if n_train < cfg.seq_len:
        raise DataError(
            f"the data yields {n_train} training tokens, fewer than one sequence of "
            f"data.seq_len={cfg.seq_len}; add documents or lower seq_len"
        )
    if n_heldout == 0:
        raise DataError(
            f"no document was held out for evaluation (heldout_fraction={cfg.heldout_fraction}, "
            f"{sum(s['documents_read'] for s in stats)} documents); raise data.heldout_fraction or add documents"
        )
    if max_tokens is not None and n_train < max_tokens:
        log.warning(
            "data: only %d training tokens for a budget of %d; batches will repeat (%.1f epochs)",
            n_train, max_tokens, max_tokens / n_train,
        )
