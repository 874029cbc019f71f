"""Text sources: named collections of documents, each walked in an order drawn from the seed.

A source yields ``(doc_id, read)`` pairs, ``read()`` giving the text; ids are stable
strings (file paths, topic names, row numbers, positions in a shuffled stream) from
which, with the seed, the held-out split is decided (:func:`is_heldout`).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import random
import sys
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..recipe import DataSource

BUILTIN_SOURCES = ("builtin:python-stdlib", "builtin:python-packages", "builtin:python-docs", "builtin:wikipedia",
                   "builtin:news", "builtin:teacher-samples")
SHUFFLE_BUFFER = 10_000  # documents in a streamed dataset's shuffle buffer (part of the order, so of the cache key)
# stdlib directories that are not ordinary library code (tests, tools, data tables, the docs corpus)
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages",
     "__pycache__", "encodings", "pydoc_data", "lib2to3", "ensurepip", "__phello__"}
)

Document = tuple[str, Callable[[], str]]  # (doc id, read its text)


def derive_seed(*parts: object) -> int:
    """A 63-bit integer from any parts, identical in every process (no ``hash()`` randomisation)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def is_heldout(seed: int, source: str, doc_id: str, fraction: float) -> bool:
    """Whether a document is held out: a stable hash against ``fraction``."""
    return derive_seed("split", seed, source, doc_id) / float(1 << 63) < fraction


class TextSource(ABC):
    """A named collection of documents addressed by stable string ids."""

    streamed = False  # documents arrive as a stream of unknown length (no listing up front)
    read_batch = 32  # documents tokenized per call (the Rust tokenizer parallelises within a call)

    def __init__(self, spec: DataSource) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.source

    @property
    def split_key(self) -> str:
        """What, with the seed and document ids, decides document order and split (stable across machines)."""
        return self.spec.source

    def identity(self) -> dict[str, Any]:
        """What, besides the recipe entry, decides this source's text (part of the on-disk cache key)."""
        return {}

    @abstractmethod
    def doc_ids(self) -> list[str]:
        """Every document id, in a fixed (sorted) order."""

    @abstractmethod
    def read(self, doc_id: str) -> str:
        """The text of one document."""

    def documents(self, seed: int) -> Iterator[Document]:
        """Every document in the order drawn from ``seed``; the text is read only when asked for."""
        ids = self.doc_ids()
        random.Random(derive_seed("order", seed, self.split_key)).shuffle(ids)
        for doc_id in ids:
            yield doc_id, partial(self.read, doc_id)


def library_files(top: Path) -> Iterator[Path]:
    """The ``.py`` files below ``top`` that are library code: no test files or directories, none of
    :data:`_STDLIB_SKIP_DIRS`, nothing hidden."""
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(("test", "."))]
        for f in filenames:
            if f.endswith(".py") and not f.startswith("test"):
                yield Path(dirpath) / f


class StdlibSource(TextSource):
    """``builtin:python-stdlib``: the standard library's own ``.py`` files."""

    def __init__(self, spec: DataSource) -> None:
        super().__init__(spec)
        self.root = Path(sysconfig.get_paths()["stdlib"])

    def identity(self) -> dict[str, Any]:
        return {"python": sys.version}

    def doc_ids(self) -> list[str]:
        return sorted(path.relative_to(self.root).as_posix() for path in library_files(self.root))

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

    def identity(self) -> dict[str, Any]:
        return {"python": sys.version}

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

    def identity(self) -> dict[str, Any]:
        listing = hashlib.sha256()
        for rel in self.files:
            st = (self.base / rel).stat()
            listing.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return {"files": len(self.files), "listing": listing.hexdigest()[:20]}

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


def open_source(spec: DataSource, sampler: Any = None) -> TextSource:
    """The :class:`TextSource` for one recipe data source (``sampler``: the teacher, for ``builtin:teacher-samples``)."""
    if spec.source == "builtin:python-stdlib":
        return StdlibSource(spec)
    if spec.source == "builtin:python-packages":
        from .site_packages import PackagesSource

        return PackagesSource(spec)
    if spec.source == "builtin:python-docs":
        return DocsSource(spec)
    if spec.source in ("builtin:wikipedia", "builtin:news"):
        from .packaged import open_packaged

        return open_packaged(spec)
    if spec.source == "builtin:teacher-samples":
        from .teacher_samples import TeacherSamplesSource

        return TeacherSamplesSource(spec, sampler)
    if spec.source.startswith("builtin:"):
        raise DataError(f"unknown builtin data source {spec.source!r}; builtins: {', '.join(BUILTIN_SOURCES)}")
    if spec.source.startswith("hf:"):
        from .hub import HFSource

        return HFSource(spec)
    return FilesSource(spec)
