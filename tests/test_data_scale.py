"""Data at hub scale: streamed ``hf:`` sources, on-disk token files, memmap-backed batches (offline)."""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import surgery.data.corpus as corpus_mod
from surgery.data import (
    BatchStream,
    Corpus,
    heldout_batches,
    is_heldout,
    tokens_fingerprint,
)
from surgery.errors import DataError
from surgery.recipe import DataConfig, DataSource
from surgery.tokenizers import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache directory."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


# --------------------------------------------------------------------------- a fake hub


class FakeStream:
    """What ``load_dataset(..., streaming=True)`` returns, reduced to what the data code uses."""

    column_names = None  # a stream does not know its columns up front

    def __init__(self, rows: list[dict[str, Any]], counter: dict[str, int], seed: int | None = None,
                 buffer: int = 0, fail_after: int | None = None) -> None:
        self.rows, self.counter, self.seed, self.buffer, self.fail_after = rows, counter, seed, buffer, fail_after

    def shuffle(self, seed: int | None = None, buffer_size: int = 1000) -> FakeStream:
        return FakeStream(self.rows, self.counter, seed, buffer_size, self.fail_after)

    def _source(self):
        for n, row in enumerate(self.rows):
            if self.fail_after is not None and n == self.fail_after:
                raise ConnectionError("connection reset by peer")
            self.counter["read"] += 1
            yield row

    def __iter__(self):
        if self.seed is None:
            yield from self._source()
            return
        rng, buf = random.Random(self.seed), []
        for row in self._source():  # the buffer shuffle IterableDataset.shuffle does
            if len(buf) < self.buffer:
                buf.append(row)
                continue
            i = rng.randrange(self.buffer)
            yield buf[i]
            buf[i] = row
        rng.shuffle(buf)
        yield from buf


class FakeTable(list):
    """What ``load_dataset(..., streaming=False)`` returns: rows by index, columns known."""

    @property
    def column_names(self) -> list[str]:
        return list(self[0])


class FakeHub:
    def __init__(self) -> None:
        self.datasets: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        self.calls: list[dict[str, Any]] = []
        self.counter = {"read": 0}
        self.fail_after: int | None = None

    def add(self, name: str, config: str | None, rows: list[dict[str, Any]]) -> None:
        self.datasets[(name, config)] = rows

    def load_dataset(self, name: str, config: str | None = None, *, split: str = "train", streaming: bool = False):
        self.calls.append({"name": name, "config": config, "split": split, "streaming": streaming})
        if (name, config) not in self.datasets:
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        rows = self.datasets[(name, config)]
        return FakeStream(rows, self.counter, fail_after=self.fail_after) if streaming else FakeTable(rows)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """A fake ``datasets`` module (whether or not the real one is installed): no network."""
    fake = FakeHub()
    module = types.ModuleType("datasets")
    module.load_dataset = fake.load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return fake


def _marked_rows(n: int, field: str = "text") -> list[dict[str, Any]]:
    return [{field: f"doc{i:05d}x " + "lorem ipsum dolor " * (1 + i % 4), "url": f"u{i}"} for i in range(n)]


def _markers(tok, tokens: torch.Tensor) -> list[str]:
    return re.findall(r"doc\d{5}x", tok.decode(tokens.long()))


# --------------------------------------------------------------------------- streamed hf: sources


def test_streamed_source_is_seeded_lazy_and_on_disk(tok, hub: FakeHub, cache: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("surgery.data.hub.SHUFFLE_BUFFER", 100)
    hub.add("org/web", "en", _marked_rows(5000))
    cfg = DataConfig(sources=["hf:org/web/en"], seq_len=32, heldout_fraction=0.1)
    a = Corpus.build(cfg, tok, seed=1, max_tokens=6000, heldout_tokens=600)
    assert hub.calls[0] == {"name": "org/web", "config": "en", "split": "train", "streaming": True}
    assert hub.counter["read"] < 1000  # stopped at the budget (plus read batch and shuffle buffer), not 5000 rows
    assert a.path is not None and a.path.parent == cache and a.train.dtype == torch.uint16
    assert a.train.numel() == 6000 and a.heldout.numel() == 600
    # a fresh cache, the same seed: the same tokens, documents and batches
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "other"))
    b = Corpus.build(cfg, tok, seed=1, max_tokens=6000, heldout_tokens=600)
    assert b.path != a.path and torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert a.train_docs == b.train_docs
    sa, sb = BatchStream(a.train, 32, 4, seed=1), BatchStream(b.train, 32, 4, seed=1)
    assert all(torch.equal(sa.next(), sb.next()) for _ in range(5))
    c = Corpus.build(cfg, tok, seed=2, max_tokens=6000, heldout_tokens=600)
    assert not torch.equal(a.train, c.train)


def test_streamed_split_is_stable_and_disjoint(tok, hub: FakeHub) -> None:
    hub.add("org/web", None, _marked_rows(600))
    cfg = DataConfig(sources=["hf:org/web"], seq_len=32, heldout_fraction=0.2)
    full = Corpus.build(cfg, tok, seed=3)  # no budget: the whole stream
    small = Corpus.build(cfg, tok, seed=3, max_tokens=3000, heldout_tokens=500)
    train, held = _markers(tok, full.train), _markers(tok, full.heldout)
    assert len(train) + len(held) == 600 and not set(train) & set(held)
    assert 60 < len(held) < 180
    assert torch.equal(small.train, full.train[:3000]) and torch.equal(small.heldout, full.heldout[:500])
    for doc in full.heldout_docs:  # ids are positions in the seeded stream, split by the usual hash
        source, _, position = doc.partition("::")
        assert source == "hf:org/web" and is_heldout(3, "hf:org/web", position, 0.2)
    assert not set(full.train_docs) & set(full.heldout_docs)


def test_streamed_sources_mix_by_weight(tok, hub: FakeHub, tmp_path: Path) -> None:
    hub.add("a/x", None, [{"text": "a" * 50}] * 400)
    hub.add("b/y", None, [{"text": "b" * 50}] * 400)
    local = tmp_path / "c.jsonl"
    local.write_text("".join(json.dumps({"text": "c" * 50}) + "\n" for _ in range(400)), encoding="utf-8")
    cfg = DataConfig(sources=[{"source": "hf:a/x", "weight": 3}, {"source": "hf:b/y", "weight": 1},
                              {"source": str(local), "weight": 1}], seq_len=16)
    corpus = Corpus.build(cfg, tok, seed=0, max_tokens=5000, heldout_tokens=500)
    assert corpus.path is not None
    assert [s["train_tokens"] for s in corpus.sources] == [3000, 1000, 1000]
    assert [s["heldout_tokens"] for s in corpus.sources] == [300, 100, 100]
    ids = {c: tok.convert_tokens_to_ids(c) for c in "abc"}
    train = corpus.train.long()
    assert int((train == ids["a"]).sum()) > 2900 and int((train == ids["c"]).sum()) > 950
    memory = Corpus.build(cfg, tok, seed=0, max_tokens=5000, heldout_tokens=500, storage="memory")
    assert torch.equal(memory.train, train) and list(memory.train_docs) == list(corpus.train_docs)


def test_streamed_errors_say_what_to_do(tok, hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add("org/rows", None, [{"body": "x" * 40}] * 50)
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body\)"):
        Corpus.build(DataConfig(sources=["hf:org/rows"], seq_len=16), tok, seed=0)
    with pytest.raises(DataError, match="cannot load data source 'hf:org/none'"):
        Corpus.build(DataConfig(sources=["hf:org/none"], seq_len=16), tok, seed=0)
    hub.add("org/flaky", None, _marked_rows(400))
    hub.fail_after = 100
    with pytest.raises(DataError, match="failed after .* documents .*run again"):
        Corpus.build(DataConfig(sources=["hf:org/flaky"], seq_len=16), tok, seed=0, max_tokens=20000)
    assert not [p for p in cache.iterdir()]  # nothing half-written left behind
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="pip install datasets"):
        Corpus.build(DataConfig(sources=["hf:org/rows"], seq_len=16), tok, seed=0)


def test_downloaded_hf_source_stays_in_memory(tok, hub: FakeHub) -> None:
    hub.add("org/small", None, _marked_rows(200))
    src = DataSource(source="hf:org/small", streaming=False)
    assert DataSource(source="hf:org/small").streaming  # streaming is the default
    corpus = Corpus.build(DataConfig(sources=[src], seq_len=16, heldout_fraction=0.2), tok, seed=0)
    assert hub.calls[-1]["streaming"] is False and corpus.path is None and corpus.train.dtype == torch.int64
    assert len(corpus.train_docs) + len(corpus.heldout_docs) == 200


@pytest.mark.parametrize("typed", [False, True])  # columns unknown (read from the first row) or known up front
def test_real_datasets_iterable(tok, typed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``IterableDataset`` (shuffle, column selection) behind a patched ``load_dataset``."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "url": datasets.Value("string")}) if typed else None

    def gen():
        yield from _marked_rows(300)

    def load_dataset(name, config=None, *, split="train", streaming=False):
        assert streaming
        return datasets.IterableDataset.from_generator(gen, features=features)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(sources=["hf:org/real"], seq_len=16, heldout_fraction=0.2)
    a = Corpus.build(cfg, tok, seed=5, max_tokens=4000, heldout_tokens=400, storage="memory")
    b = Corpus.build(cfg, tok, seed=5, max_tokens=4000, heldout_tokens=400, storage="memory")
    assert torch.equal(a.train, b.train) and a.train_docs == b.train_docs
    assert not set(_markers(tok, a.train)) & set(_markers(tok, a.heldout))
    assert _markers(tok, a.train)[:5] != [f"doc{i:05d}x" for i in range(5)]  # shuffled


# --------------------------------------------------------------------------- the on-disk cache


@pytest.fixture
def marked(tmp_path: Path) -> DataConfig:
    path = tmp_path / "marked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _marked_rows(400)), encoding="utf-8")
    return DataConfig(sources=[str(path)], seq_len=16, heldout_fraction=0.1)


class _NoEncoding:
    """A tokenizer backend that refuses to encode (everything else passes through)."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "inner", inner)

    def encode_batch_fast(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenized although the corpus is cached")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)


def test_disk_cache_round_trip_without_tokenizing(marked: DataConfig, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = byte_tokenizer()
    memory = Corpus.build(marked, tok, seed=0, max_tokens=8000, heldout_tokens=800, storage="memory")
    first = Corpus.build(marked, tok, seed=0, max_tokens=8000, heldout_tokens=800, storage="disk")
    assert torch.equal(first.train.long(), memory.train) and torch.equal(first.heldout.long(), memory.heldout)
    assert first.sources == memory.sources and list(first.heldout_docs) == list(memory.heldout_docs)
    files = sorted(p.name for p in first.path.iterdir())
    assert files == ["heldout.bin", "heldout_docs.jsonl", "meta.json", "train.bin", "train_docs.jsonl"]
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["train"]["tokens"] == 8000 and meta["dtype"] == "<u2" and meta["fields"]["seed"] == 0
    assert (first.path / "train.bin").stat().st_size == 8000 * 2
    assert meta["train"]["fingerprint"] == tokens_fingerprint(memory.train) == tokens_fingerprint(first.train)

    monkeypatch.setattr(tok, "_tokenizer", _NoEncoding(tok._tokenizer))
    with pytest.raises(AssertionError, match="tokenized"):  # the trap works
        Corpus.build(marked, tok, seed=0, max_tokens=8000, heldout_tokens=800, storage="memory")
    second = Corpus.build(marked, tok, seed=0, max_tokens=8000, heldout_tokens=800, storage="disk")
    assert second.path == first.path and torch.equal(second.train, first.train)
    assert second.train_docs == memory.train_docs and second.sources == memory.sources
    with pytest.raises(AssertionError, match="tokenized"):  # another budget is another corpus
        Corpus.build(marked, tok, seed=0, max_tokens=9000, heldout_tokens=800, storage="disk")
    assert [p.name for p in cache.iterdir()] == [first.path.name]


def test_threshold_switches_memory_to_disk(tok, marked: DataConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_mod, "DISK_THRESHOLD", 5000)
    small = Corpus.build(marked, tok, seed=0, max_tokens=4000, heldout_tokens=400)
    big = Corpus.build(marked, tok, seed=0, max_tokens=6000, heldout_tokens=400)
    assert small.path is None and small.train.dtype == torch.int64
    assert big.path is not None and big.train.dtype == torch.uint16
    assert torch.equal(big.train[:4000].long(), small.train)  # the same stream, only stored elsewhere
    assert Corpus.build(marked, tok, seed=0).path is None  # no budget, no stream: memory


def test_memmap_batches_resume_on_the_next_batch(tok, marked: DataConfig) -> None:
    disk = Corpus.build(marked, tok, seed=0, max_tokens=8000, heldout_tokens=800, storage="disk")
    memory = Corpus.build(marked, tok, seed=0, max_tokens=8000, heldout_tokens=800, storage="memory")
    stream = BatchStream(disk.train, seq_len=16, batch_size=7, seed=4)
    assert stream.chunks.untyped_storage().data_ptr() == disk.train.untyped_storage().data_ptr()  # a view, no copy
    for _ in range(80):  # 500 chunks: crosses into the second epoch
        stream.next()
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["fingerprint"] == BatchStream(memory.train, 16, 7, seed=4).fingerprint
    expected = [stream.next() for _ in range(3)]
    assert expected[0].dtype == torch.int64
    reopened = Corpus.build(marked, tok, seed=0, max_tokens=8000, heldout_tokens=800, storage="disk")
    restored = BatchStream(reopened.train, seq_len=16, batch_size=7, seed=4)
    restored.load_state_dict(state)
    assert all(torch.equal(restored.next(), batch) for batch in expected)
    from_memory = BatchStream(memory.train, seq_len=16, batch_size=7, seed=4)
    from_memory.load_state_dict(state)  # a checkpoint taken on disk tokens resumes on the same tokens in memory
    assert torch.equal(from_memory.next(), expected[0])
    held = heldout_batches(disk, seq_len=16, batch_size=4, tokens=160)
    assert all(b.dtype == torch.int64 for b in held)
    assert torch.equal(torch.cat(held), torch.cat(heldout_batches(memory, seq_len=16, batch_size=4, tokens=160)))


class _FailingBackend(_NoEncoding):
    """Encodes a few batches, then fails as an interrupted build would."""

    def encode_batch_fast(self, *args: Any, **kwargs: Any) -> Any:
        calls = self.__dict__.setdefault("calls", [0])
        calls[0] += 1
        if calls[0] > 3:
            raise KeyboardInterrupt
        return self.inner.encode_batch_fast(*args, **kwargs)


def test_interrupted_write_leaves_no_corrupt_cache(marked: DataConfig, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = byte_tokenizer()
    backend = tok._tokenizer
    monkeypatch.setattr(tok, "_tokenizer", _FailingBackend(backend))
    with pytest.raises(KeyboardInterrupt):
        Corpus.build(marked, tok, seed=0, max_tokens=8000, heldout_tokens=800, storage="disk")
    assert list(cache.iterdir()) == []  # neither a corpus nor its scratch directory

    # a build killed outright leaves its scratch directory; the next build on this host removes it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setattr(tok, "_tokenizer", backend)
    good = Corpus.build(marked, tok, seed=0, max_tokens=8000, heldout_tokens=800, storage="disk")
    leftover = cache / f"{good.path.name}.tmp-{socket.gethostname().replace('-', '_')}-{dead.pid}"
    leftover.mkdir()
    (leftover / "train.0.bin").write_bytes(b"\x01\x02\x03")
    (good.path / "train.bin").write_bytes(b"\x00" * 10)  # a damaged corpus is rebuilt, not read
    again = Corpus.build(marked, tok, seed=0, max_tokens=8000, heldout_tokens=800, storage="disk")
    memory = Corpus.build(marked, tok, seed=0, max_tokens=8000, heldout_tokens=800, storage="memory")
    assert torch.equal(again.train.long(), memory.train)
    assert [p.name for p in cache.iterdir()] == [good.path.name]


def test_unwritable_cache_says_where(tok, marked: DataConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(DataError, match="cannot write the token cache .*SURGERY_CACHE"):
        Corpus.build(marked, tok, seed=0, max_tokens=2000, storage="disk")


def test_storage_must_be_known(tok, marked: DataConfig) -> None:
    with pytest.raises(DataError, match="storage must be"):
        Corpus.build(marked, tok, seed=0, storage="ssd")  # type: ignore[arg-type]


def test_int32_when_the_vocabulary_is_large() -> None:
    from surgery.data.tokens import token_dtype

    class Vocab:
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

    assert token_dtype(Vocab(65536)) == np.dtype("<u2") and token_dtype(Vocab(128256)) == np.dtype("<i4")
    assert token_dtype(byte_tokenizer()) == np.dtype("<u2")
