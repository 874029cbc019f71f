"""Data pipeline: sources, held-out split, weighted mixing, packed resumable batches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from surgery.data import (
    BatchStream,
    Corpus,
    StdlibSource,
    data_config_from_cli,
    encode_texts,
    heldout_batches,
    heldout_tokens_needed,
    is_heldout,
    tokens_needed,
    train_tokens_needed,
)
from surgery.errors import DataError
from surgery.recipe import DataConfig, DataSource, Recipe
from surgery.tokenizers import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _jsonl(path: Path, texts: list[str], field: str = "text") -> str:
    path.write_text("".join(json.dumps({field: t, "other": 1}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


@pytest.fixture
def marked(tmp_path: Path) -> str:
    """A .jsonl source of 400 documents, each carrying a unique marker word."""
    texts = [f"doc{i:04d}x " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(400)]
    return _jsonl(tmp_path / "marked.jsonl", texts)


def _markers(tok, tokens: torch.Tensor) -> set[str]:
    return set(re.findall(r"doc\d{4}x", tok.decode(tokens)))


# --------------------------------------------------------------------------- split


def test_heldout_never_overlaps_training(tok, marked: str) -> None:
    cfg = DataConfig(sources=[marked], seq_len=32, heldout_fraction=0.2)
    corpus = Corpus.build(cfg, tok, seed=3)
    assert corpus.heldout.numel() > 0 and corpus.train.numel() > 0
    assert not set(corpus.train_docs) & set(corpus.heldout_docs)
    assert len(corpus.train_docs) + len(corpus.heldout_docs) == 400
    train, held = _markers(tok, corpus.train), _markers(tok, corpus.heldout)
    assert len(train) + len(held) == 400 and not train & held
    assert 40 < len(held) < 120  # ~20 % of 400


def test_split_does_not_depend_on_budget(tok, marked: str) -> None:
    cfg = DataConfig(sources=[marked], seq_len=32, heldout_fraction=0.2)
    small = Corpus.build(cfg, tok, seed=3, max_tokens=2000, heldout_tokens=500)
    full = Corpus.build(cfg, tok, seed=3)
    assert small.train.numel() == 2000 and small.heldout.numel() == 500
    assert set(small.train_docs) <= set(full.train_docs)
    assert set(small.heldout_docs) <= set(full.heldout_docs)
    # the budget only truncates: the small corpus is a prefix of the full one
    assert torch.equal(small.train, full.train[:2000]) and torch.equal(small.heldout, full.heldout[:500])
    for doc in full.heldout_docs:
        _, _, doc_id = doc.partition("::")
        assert is_heldout(3, "files", doc_id, 0.2)


def test_seed_changes_order_and_split(tok, marked: str) -> None:
    cfg = DataConfig(sources=[marked], seq_len=32, heldout_fraction=0.2)
    a = Corpus.build(cfg, tok, seed=1, max_tokens=3000)
    b = Corpus.build(cfg, tok, seed=1, max_tokens=3000)
    c = Corpus.build(cfg, tok, seed=2, max_tokens=3000)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert not torch.equal(a.train, c.train)
    assert a.train_docs != c.train_docs


def test_documents_end_with_eos(tok, tmp_path: Path) -> None:
    cfg = DataConfig(sources=[_jsonl(tmp_path / "d.jsonl", ["abc", "de"] * 20)], seq_len=8, heldout_fraction=0.1)
    corpus = Corpus.build(cfg, tok, seed=0)
    assert int((corpus.train == tok.eos_token_id).sum()) == len(corpus.train_docs)
    assert corpus.train[-1] == tok.eos_token_id


# --------------------------------------------------------------------------- sources


def test_txt_and_jsonl_globs(tok, tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i in range(30):
        (tmp_path / "a" / ("b" if i % 2 else "") / f"f{i}.txt").write_text(f"text file {i} " * 20, encoding="utf-8")
    _jsonl(tmp_path / "a" / "lines.jsonl", [f"json line {i} " * 5 for i in range(50)], field="body")
    txt = Corpus.build(DataConfig(sources=[str(tmp_path / "a/**/*.txt")], seq_len=16, heldout_fraction=0.2), tok, seed=0)
    assert len(txt.train_docs) + len(txt.heldout_docs) == 30
    src = DataSource(source=str(tmp_path / "a/*.jsonl"), text_field="body")
    lines = Corpus.build(DataConfig(sources=[src], seq_len=16, heldout_fraction=0.2), tok, seed=0)
    assert len(lines.train_docs) + len(lines.heldout_docs) == 50
    assert "json line" in tok.decode(lines.train[:40])


def test_weights_mix_sources(tok, tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", ["a" * 50] * 400)
    b = _jsonl(tmp_path / "b.jsonl", ["b" * 50] * 400)
    cfg = DataConfig(sources=[{"source": a, "weight": 3}, {"source": b, "weight": 1}], seq_len=16)
    corpus = Corpus.build(cfg, tok, seed=0, max_tokens=4000, heldout_tokens=400)
    a_id, b_id = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    assert int((corpus.train == a_id).sum()) > 2900 and int((corpus.train == b_id).sum()) > 950
    assert [s["train_tokens"] for s in corpus.sources] == [3000, 1000]
    assert [s["heldout_tokens"] for s in corpus.sources] == [300, 100]


def test_dry_source_leaves_its_share_to_others(tok, tmp_path: Path) -> None:
    small = _jsonl(tmp_path / "small.jsonl", ["s" * 30] * 10)
    big = _jsonl(tmp_path / "big.jsonl", ["b" * 50] * 400)
    cfg = DataConfig(sources=[small, big], seq_len=16, heldout_fraction=0.05)
    corpus = Corpus.build(cfg, tok, seed=0, max_tokens=6000, heldout_tokens=300)
    assert corpus.train.numel() == 6000 and corpus.heldout.numel() == 300
    assert corpus.sources[0]["exhausted"] and corpus.sources[0]["train_tokens"] < 400


def test_builtin_docs(tok) -> None:
    cfg = DataConfig(sources=["builtin:python-docs"], seq_len=64)
    corpus = Corpus.build(cfg, tok, seed=0, max_tokens=20000, heldout_tokens=2000)
    assert corpus.train.numel() == 20000 and corpus.heldout.numel() == 2000
    text = tok.decode(corpus.train[:2000])
    assert len(re.findall(r"\b(the|and|of)\b", text)) > 10


def test_builtin_stdlib_listing() -> None:
    ids = StdlibSource(DataSource(source="builtin:python-stdlib")).doc_ids()
    assert ids == sorted(ids) and len(ids) > 100
    assert "os.py" in ids and "json/decoder.py" in ids
    parts = {p for doc in ids for p in doc.split("/")[:-1]}
    assert not parts & {"test", "tests", "idlelib", "turtledemo", "site-packages", "pydoc_data"}
    assert not any(doc.rsplit("/", 1)[-1].startswith("test") for doc in ids)


def test_builtin_stdlib_build(tok) -> None:
    cfg = DataConfig(sources=["builtin:python-stdlib"], seq_len=64)
    corpus = Corpus.build(cfg, tok, seed=0, max_tokens=30000, heldout_tokens=3000)
    assert corpus.train.numel() == 30000
    assert all(doc.endswith(".py") for doc in corpus.train_docs)


def test_encode_keeps_special_token_text_as_text(tok) -> None:
    [ids] = encode_texts(tok, ["a</s>b"])
    assert tok.eos_token_id not in ids and len(ids) == 6


# --------------------------------------------------------------------------- errors


def test_errors_for_empty_or_bad_sources(tok, tmp_path: Path) -> None:
    def build(source, **kw):
        return Corpus.build(DataConfig(sources=[source], seq_len=16), tok, seed=0, **kw)

    with pytest.raises(DataError, match="matches no files"):
        build(str(tmp_path / "*.jsonl"))
    with pytest.raises(DataError, match="unknown builtin"):
        build("builtin:python-stdlb")
    empty = _jsonl(tmp_path / "empty.jsonl", ["", "   ", "\n"])
    with pytest.raises(DataError, match="yields no text"):
        build(empty)
    with pytest.raises(DataError, match="no field 'text'"):
        build(_jsonl(tmp_path / "f.jsonl", ["x"], field="body"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        build(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00 binary")
    with pytest.raises(DataError, match="not UTF-8"):
        build(str(tmp_path / "bin.txt"))
    tiny = _jsonl(tmp_path / "tiny.jsonl", ["ab"] * 3)
    with pytest.raises(DataError, match="fewer than one sequence"):
        build(tiny)


def test_no_heldout_document(tok, tmp_path: Path) -> None:
    one = _jsonl(tmp_path / "one.jsonl", ["x" * 200])
    cfg = DataConfig(sources=[one], seq_len=16, heldout_fraction=0.01)
    with pytest.raises(DataError, match="heldout_fraction"):
        Corpus.build(cfg, tok, seed=0)


def test_hf_source_without_datasets(tok) -> None:
    pytest.importorskip("tokenizers")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            Corpus.build(DataConfig(sources=["hf:wikitext/wikitext-2-raw-v1"]), tok, seed=0)
    else:
        pytest.skip("datasets is installed")


# --------------------------------------------------------------------------- batches


def _tokens(n: int = 1000) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long)  # token value == position: easy to check


def test_batches_deterministic_and_seeded() -> None:
    a = BatchStream(_tokens(), seq_len=10, batch_size=4, seed=0)
    b = BatchStream(_tokens(), seq_len=10, batch_size=4, seed=0)
    c = BatchStream(_tokens(), seq_len=10, batch_size=4, seed=1)
    xa, xb, xc = a.next(), b.next(), c.next()
    assert xa.shape == (4, 10) and xa.dtype == torch.int64
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert (xa[:, 0] % 10 == 0).all() and (xa.diff(dim=1) == 1).all()  # whole packed chunks
    assert a.tokens_served == 40


def test_epoch_covers_every_chunk_then_reshuffles() -> None:
    stream = BatchStream(_tokens(1005), seq_len=10, batch_size=5, seed=0)  # 100 chunks, tail of 5 unused
    first = torch.cat([stream.next() for _ in range(20)])[:, 0] // 10
    second = torch.cat([stream.next() for _ in range(20)])[:, 0] // 10
    assert sorted(first.tolist()) == list(range(100)) == sorted(second.tolist())
    assert not torch.equal(first, second)
    assert stream.epoch == 2 and stream.position == 0


@pytest.mark.parametrize("consumed", [3, 7, 9])  # 10 chunks, batch 3: batch 4 straddles epochs 0/1
def test_resume_yields_exactly_the_next_batch(consumed: int) -> None:
    stream = BatchStream(_tokens(100), seq_len=10, batch_size=3, seed=5)
    for _ in range(consumed):
        stream.next()
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [stream.next() for _ in range(5)]
    restored = BatchStream(_tokens(100), seq_len=10, batch_size=3, seed=5)
    restored.load_state_dict(state)
    assert restored.tokens_served == consumed * 30
    for batch in expected:
        assert torch.equal(restored.next(), batch)


def test_resume_refuses_other_data() -> None:
    state = BatchStream(_tokens(100), seq_len=10, batch_size=3, seed=5).state_dict()
    with pytest.raises(DataError, match="fingerprint"):
        BatchStream(_tokens(100).flip(0), seq_len=10, batch_size=3, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        BatchStream(_tokens(100), seq_len=5, batch_size=3, seed=5).load_state_dict(state)


def test_batch_larger_than_epoch() -> None:
    stream = BatchStream(_tokens(30), seq_len=10, batch_size=7, seed=0)
    batch = stream.next()
    assert batch.shape == (7, 10) and stream.epoch == 2 and stream.position == 1


def test_too_few_tokens_for_a_sequence() -> None:
    with pytest.raises(DataError, match="seq_len"):
        BatchStream(_tokens(5), seq_len=10, batch_size=1, seed=0)


def test_heldout_batches(tok, marked: str) -> None:
    corpus = Corpus.build(DataConfig(sources=[marked], seq_len=32, heldout_fraction=0.2), tok, seed=0)
    batches = heldout_batches(corpus, seq_len=32, batch_size=4, tokens=32 * 10)
    assert [b.shape for b in batches] == [(4, 32), (4, 32), (2, 32)]
    assert torch.equal(torch.cat(batches).flatten(), corpus.heldout[:320])
    again = heldout_batches(corpus, seq_len=32, batch_size=4, tokens=32 * 10)
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    with pytest.raises(DataError, match="held-out"):
        heldout_batches(corpus, seq_len=corpus.heldout.numel() + 1, batch_size=1, tokens=10)


# --------------------------------------------------------------------------- recipe helpers


def test_data_config_from_cli() -> None:
    cfg = data_config_from_cli("builtin:python-docs", seq_len=128)
    assert [s.source for s in cfg.sources] == ["builtin:python-docs"] and cfg.seq_len == 128
    cfg = data_config_from_cli("builtin:python-stdlib=3, data/a=b.jsonl ,builtin:python-docs=1", seq_len=64)
    assert [(s.source, s.weight) for s in cfg.sources] == [
        ("builtin:python-stdlib", 3.0),
        ("data/a=b.jsonl", 1.0),
        ("builtin:python-docs", 1.0),
    ]
    with pytest.raises(DataError):
        data_config_from_cli(" , ", seq_len=64)
    with pytest.raises(DataError):
        data_config_from_cli("builtin:python-docs=-1", seq_len=64)


def test_tokens_needed() -> None:
    recipe = Recipe.model_validate(
        {
            "teacher": {"model": "random:llama"},
            "data": {"sources": ["builtin:python-docs"], "seq_len": 64},
            "output": {"dir": "out"},
            "replace": [{"mixer": "discrete_mamba2"}],
            "stages": {
                "stage1": {"tokens": 1024, "tokens_per_step": 256},
                "stage2": {"enabled": False},
                "stage3": {"tokens": 2048, "tokens_per_step": 256},
            },
            "verify": {"tokens": 512},
        }
    )
    assert train_tokens_needed(recipe) == 3072
    assert heldout_tokens_needed(recipe) == 512
    assert tokens_needed(recipe) == 3584
    corpus = Corpus.for_recipe(recipe, byte_tokenizer())
    assert corpus.train.numel() == 3072 and corpus.heldout.numel() == 512


def test_file_ids_are_relative_so_the_split_survives_a_move(tok, tmp_path: Path) -> None:
    for where in ("one", "two"):
        (tmp_path / where / "sub").mkdir(parents=True)
        for i in range(40):
            (tmp_path / where / "sub" / f"f{i}.txt").write_text(f"file {i} " * 10, encoding="utf-8")
    cfg = lambda where: DataConfig(sources=[str(tmp_path / where / "**/*.txt")], seq_len=16, heldout_fraction=0.2)  # noqa: E731
    a, b = Corpus.build(cfg("one"), tok, seed=0), Corpus.build(cfg("two"), tok, seed=0)
    assert [d.split("::")[1] for d in a.heldout_docs] == [d.split("::")[1] for d in b.heldout_docs]
    assert a.train_docs[0].split("::")[1].startswith("sub/")
    assert torch.equal(a.train, b.train)


def test_tokenizer_specials_kept_per_document(tmp_path: Path) -> None:
    from tokenizers.processors import TemplateProcessing

    tok = byte_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    cfg = DataConfig(sources=[_jsonl(tmp_path / "d.jsonl", ["abc", "de"] * 20)], seq_len=8, heldout_fraction=0.1)
    corpus = Corpus.build(cfg, tok, seed=0)
    n = len(corpus.train_docs)
    assert int((corpus.train == 1).sum()) == n == int((corpus.train == 2).sum())
    assert corpus.train[0] == 1 and corpus.train[-1] == 2
