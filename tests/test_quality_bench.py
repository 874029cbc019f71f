"""bench/quality.py: the held-out suite packs the right documents and scores both models on the same tokens."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from surgery.data import is_heldout
from surgery.data.sources import open_source
from surgery.mixers.testing import naive_student
from surgery.random_models import random_model
from surgery.recipe import DataSource
from surgery.tokenizers import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_suite_sets_and_held_out_documents() -> None:
    q = bench()
    sets = {s.name: s for s in q.default_sets()}
    assert set(sets) == {"english-news", "english-wiki", "python-3rd-party", "python-stdlib"}
    assert sets["python-3rd-party"].source.endswith("networkx/**/*.py")
    tok = byte_tokenizer()
    split = (0, 0.2, {"builtin:wikipedia"})
    batches = q.token_batches(sets["english-wiki"], tok, split, seq_len=64, tokens=640, batch_size=4)
    assert sum(b.numel() for b in batches) == 640 and all(b.shape[1] == 64 for b in batches)
    # only held-out articles: the text comes from documents the split held out
    wiki = open_source(DataSource(source="builtin:wikipedia"))
    held = [d for d in wiki.doc_ids() if is_heldout(0, wiki.split_key, d, 0.2)]
    first = tok.decode(batches[0][0])
    assert first.startswith(held[0][:10]) or held[0] in tok.decode(torch.cat([b.flatten() for b in batches]))
    # a set the student never trained on is taken whole
    all_wiki = q.token_batches(sets["english-wiki"], tok, (0, 0.2, set()), seq_len=64, tokens=640, batch_size=4)
    assert tok.decode(all_wiki[0][0]).startswith(sorted(wiki.doc_ids())[0][:10])


def test_score_compares_on_the_same_tokens() -> None:
    q = bench()
    teacher = random_model("llama").eval()
    student = naive_student(teacher).eval()
    batches = [torch.randint(3, 300, (2, 16)) for _ in range(2)]
    same = q.score(teacher, teacher, batches, torch.device("cpu"))
    assert same["ratio"] == 1.0 and same["top1"] == 1.0 and same["tokens"] == 64
    other = q.score(teacher, student, batches, torch.device("cpu"))
    assert other["teacher_ppl"] == same["teacher_ppl"] and other["ratio"] > 0 and 0 <= other["top1"] <= 1
