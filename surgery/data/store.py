"""Token streams on disk: one directory per corpus under ``cache_dir()/data/<key>``.

Layout (raw little-endian binary and JSON only, nothing executable)::

    <key>/meta.json            key fields, dtype, per split: tokens, documents, fingerprint; per-source stats
    <key>/train.bin            training ids, uint16 (vocabulary <= 65536) or int32
    <key>/heldout.bin          held-out ids, same dtype
    <key>/train_docs.jsonl     one JSON string per document ('source::doc_id'), in stream order
    <key>/heldout_docs.jsonl

``<key>`` hashes what decides the tokens: the sources (recipe entries plus what
identifies their text: the Python version for builtins, names, sizes and mtimes for
local files, the shuffle buffer for streams), the tokenizer's content, the seed, both
budgets and the held-out fraction. A build writes into ``<key>.tmp-<host>-<pid>/``
(each reader's pieces to its own segment file, joined in reader order at the end) and
renames it to ``<key>`` only when complete: an interrupted build leaves no ``<key>``,
its leftover is removed by the next build on the same host, and that build starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import DataError
from ..io import fsync_dir
from .reader import SPLITS

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what the tokens are made of changes (invalidates every cached corpus)
_FLUSH_TOKENS = 1 << 20  # tokens buffered per segment before a write
_COPY_BYTES = 1 << 24  # bytes per read when joining and hashing segments


def data_cache_root() -> Path:
    """``cache_dir()/data`` (``$SURGERY_CACHE/data`` where that is set)."""
    from ..teacher import cache_dir

    return cache_dir() / "data"


def cache_key(fields: dict[str, Any]) -> str:
    """Directory name for a corpus: a hash of its key fields."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- writing


class DiskSink:
    """Appends each (reader, split)'s pieces to a segment file in ``tmp``; :meth:`finish` joins them."""

    def __init__(self, tmp: Path, dtype: np.dtype) -> None:
        self.tmp, self.dtype = tmp, np.dtype(dtype)
        self.limit = np.iinfo(self.dtype).max
        self._buffers: dict[tuple[int, str], list[np.ndarray]] = {}
        self._buffered: dict[tuple[int, str], int] = {}
        self._docs: dict[tuple[int, str], list[str]] = {}
        self._last: dict[tuple[int, str], str] = {}
        self.doc_counts: dict[tuple[int, str], int] = {}
        self._files: dict[tuple[int, str], tuple[BinaryIO, Any]] = {}

    def _segment(self, key: tuple[int, str], suffix: str) -> Path:
        return self.tmp / f"{key[1]}.{key[0]}.{suffix}"

    def add(self, reader: int, split: str, doc: str, tokens: np.ndarray) -> None:
        key = (reader, split)
        self._buffers.setdefault(key, []).append(tokens)
        self._buffered[key] = self._buffered.get(key, 0) + len(tokens)
        if self._last.get(key) != doc:
            self._last[key] = doc
            self._docs.setdefault(key, []).append(doc)
            self.doc_counts[key] = self.doc_counts.get(key, 0) + 1
        if self._buffered[key] >= _FLUSH_TOKENS:
            self._flush(key)

    def _flush(self, key: tuple[int, str]) -> None:
        pieces, docs = self._buffers.pop(key, []), self._docs.pop(key, [])
        self._buffered[key] = 0
        if key not in self._files:
            ids_out = open(self._segment(key, "bin"), "wb")  # noqa: SIM115 - open until close()
            docs_out = open(self._segment(key, "jsonl"), "w", encoding="utf-8")  # noqa: SIM115
            self._files[key] = (ids_out, docs_out)
        ids_file, docs_file = self._files[key]
        if pieces:
            ids = np.concatenate(pieces)
            if ids.size and (ids.min() < 0 or ids.max() > self.limit):
                raise DataError(
                    f"token id {int(ids.max())} does not fit the on-disk {self.dtype.name} of this tokenizer "
                    f"(len(tokenizer) too small?); report this, or build the corpus with storage='memory'"
                )
            ids_file.write(ids.astype(self.dtype).tobytes())
        docs_file.writelines(json.dumps(d) + "\n" for d in docs)

    def close(self) -> None:
        """Flush every buffer and close every segment file."""
        for key in list(self._buffers):
            self._flush(key)
        for ids_file, docs_file in self._files.values():
            for f in (ids_file, docs_file):
                f.flush()
                os.fsync(f.fileno())
                f.close()
        self._files.clear()

    def finish(self, split: str, readers: int) -> dict[str, Any]:
        """Join ``split``'s segments in reader order into ``<split>.bin`` / ``<split>_docs.jsonl``; its counts and fingerprint."""
        keys = [(r, split) for r in range(readers)]
        out = self.tmp / f"{split}.bin"
        digest, count = hashlib.sha256(), 0
        segments = [p for p in (self._segment(k, "bin") for k in keys) if p.exists()]
        if len(segments) == 1:  # one source: the segment is the file (no copy)
            os.replace(segments[0], out)
            segments = [out]
        with open(out, "ab") as joined:
            for seg in segments:
                with open(seg, "rb") as f:
                    while chunk := f.read(_COPY_BYTES):
                        ids = np.frombuffer(chunk, dtype=self.dtype)
                        digest.update(ids.astype(np.int64))
                        count += len(ids)
                        if seg != out:
                            joined.write(chunk)
                if seg != out:
                    seg.unlink()
            joined.flush()
            os.fsync(joined.fileno())
        with open(self.tmp / f"{split}_docs.jsonl", "w", encoding="utf-8") as joined:
            for key in keys:
                seg = self._segment(key, "jsonl")
                if seg.exists():
                    with open(seg, encoding="utf-8") as f:
                        shutil.copyfileobj(f, joined)
                    seg.unlink()
        return {
            "tokens": count,
            "documents": sum(self.doc_counts.get(k, 0) for k in keys),
            "fingerprint": digest.hexdigest()[:16],
        }


def scratch_dir(root: Path, key: str) -> Path:
    """A fresh build directory for ``key`` (after removing this host's leftovers of dead builds)."""
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("-", "_")
    for old in root.glob(f"{key}.tmp-*"):
        old_host, _, pid = old.name.rpartition("-")
        if old_host == f"{key}.tmp-{host}" and pid.isdigit() and not _alive(int(pid)):
            log.info("data: removing %s, left by an interrupted build", old)
            shutil.rmtree(old, ignore_errors=True)
    tmp = root / f"{key}.tmp-{host}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` and move the finished build into place in one rename."""
    with open(tmp / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.rename(tmp, final)
    except OSError:
        if read_meta(final, meta["key"]) is None:  # not another build's finished copy
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same corpus first
    fsync_dir(final.parent)


# --------------------------------------------------------------------------- reading


def read_meta(path: Path, key: str) -> dict[str, Any] | None:
    """``path``'s metadata if it holds a complete corpus for ``key``, else ``None``."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        complete = meta["format"] == FORMAT and meta["key"] == key and all(
            (path / f"{s}.bin").stat().st_size == meta[s]["tokens"] * itemsize and (path / f"{s}_docs.jsonl").is_file()
            for s in SPLITS
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


def discard_broken(path: Path, key: str) -> None:
    """Remove ``path`` if it exists but is not a complete corpus for ``key`` (a rebuild replaces it)."""
    if path.exists() and read_meta(path, key) is None:
        log.warning("data: %s is incomplete or from another version; tokenizing again", path)
        shutil.rmtree(path, ignore_errors=True)


def open_tokens(path: Path, split: str, meta: dict[str, Any]) -> torch.Tensor:
    """``split``'s ids as a 1-D tensor over the file (copy-on-write map: nothing is read until indexed)."""
    dtype, count = np.dtype(meta["dtype"]), meta[split]["tokens"]
    if count == 0:
        return torch.from_numpy(np.zeros(0, dtype=dtype))
    tokens = torch.from_numpy(np.memmap(path / f"{split}.bin", dtype=dtype, mode="c", shape=(count,)))
    tokens._surgery_fingerprint = meta[split]["fingerprint"]  # type: ignore[attr-defined]  # BatchStream reads it
    return tokens


class DocList(Sequence[str]):
    """Document names of one split, read from ``<split>_docs.jsonl`` when first looked at."""

    def __init__(self, path: Path, count: int) -> None:
        self.path, self.count = path, count
        self._docs: list[str] | None = None

    def _load(self) -> list[str]:
        if self._docs is None:
            with open(self.path, encoding="utf-8") as f:
                self._docs = [json.loads(line) for line in f]
        return self._docs

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: Any) -> Any:
        return self._load()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"DocList({str(self.path)!r}, {self.count} documents)"
