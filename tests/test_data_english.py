"""General English offline: packaged corpora (gensim's wheel) and samples from the teacher itself."""

from __future__ import annotations

import pytest
import torch

from surgery.data import Corpus
from surgery.data.packaged import NewsSource, WikipediaSource, wiki_to_text
from surgery.data.teacher_samples import TeacherSampler, TeacherSamplesSource
from surgery.errors import DataError
from surgery.random_models import random_model
from surgery.recipe import DataConfig, DataSource, Recipe, SamplingConfig
from surgery.tokenizers import byte_tokenizer


def test_wiki_markup_is_stripped_to_prose() -> None:
    raw = ("{{Infobox person|name=X|born={{birth date|1900}}}}'''Ada''' was a [[mathematician|mathematician]] "
           "from [[London]].<ref>{{cite book|title=T}}</ref> [[File:Ada.jpg|thumb|Ada [[Lovelace]]]]\n"
           "== Early life ==\n* She studied [http://example.org analysis].\n{| class=wikitable\n| a || b\n|}\n"
           "[[Category:Mathematicians]]")
    assert wiki_to_text(raw) == "Ada was a mathematician from London.\nEarly life\nShe studied analysis."


def test_wikipedia_and_news_are_real_english_articles() -> None:
    wiki = WikipediaSource(DataSource(source="builtin:wikipedia"))
    ids = wiki.doc_ids()
    assert len(ids) == 106 and "Anarchism" in ids
    text = wiki.read("Anarchism")
    assert text.startswith("Anarchism\n\n") and "political philosophy" in text and "{{" not in text and "[[" not in text
    news = NewsSource(DataSource(source="builtin:news"))
    assert len(news.doc_ids()) == 350
    assert "bushfire" in news.read("lee_background.cor:0000") and "Democrats" in news.read("lee.cor:0000")
    assert wiki.identity()["package"] == "gensim==4.4.0" and "CC BY-SA" in wiki.identity()["licence"]


def test_packaged_sources_without_gensim_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps gensim==4\.4\.0"):
        WikipediaSource(DataSource(source="builtin:wikipedia")).doc_ids()


def test_sampling_options_only_for_teacher_samples() -> None:
    assert DataSource(source="builtin:teacher-samples", sampling={"length": 32}).sampling.length == 32
    with pytest.raises(ValueError, match="sampling applies to builtin:teacher-samples only"):
        DataSource(source="builtin:wikipedia", sampling={"length": 32})


class CountingSampler(TeacherSampler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def sample(self, n, cfg, seed):
        self.calls += 1
        return super().sample(n, cfg, seed)


@pytest.fixture(scope="module")
def sampler() -> CountingSampler:
    model = random_model("llama").eval()  # vocab 320 >= the byte tokenizer's
    return CountingSampler(model, byte_tokenizer(), identity={"ref": "random:llama", "test": True})


def test_teacher_samples_are_seeded_batched_and_split(sampler: CountingSampler, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    cfg = DataConfig(sources=[{"source": "builtin:teacher-samples",
                               "sampling": {"length": 24, "batch_size": 8, "temperature": 1.0}}],
                     seq_len=16, heldout_fraction=0.2)
    before = sampler.calls
    a = Corpus.build(cfg, sampler.tokenizer, seed=3, max_tokens=400, heldout_tokens=64, sampler=sampler)
    assert sampler.calls > before and a.path is not None  # streamed: written to the on-disk token cache
    assert all(d.startswith("builtin:teacher-samples::sample-") for d in list(a.train_docs) + list(a.heldout_docs))
    assert not set(a.train_docs) & set(a.heldout_docs) and a.heldout.numel() >= 64
    calls = sampler.calls
    b = Corpus.build(cfg, sampler.tokenizer, seed=3, max_tokens=400, heldout_tokens=64, sampler=sampler)
    assert sampler.calls == calls and torch.equal(a.train, b.train)  # reused from the cache, nothing re-sampled
    # the same batch twice gives the same text; another seed other text
    tokens, seconds = sampler.tokens, sampler.seconds
    one = sampler.sample(4, SamplingConfig(length=16), seed=11)
    assert sampler.tokens - tokens == 4 * 16 and sampler.seconds > seconds  # counted for the run's timings
    assert one == sampler.sample(4, SamplingConfig(length=16), seed=11) != sampler.sample(4, SamplingConfig(length=16), seed=12)


def test_teacher_samples_start_from_prompts_in_turn(sampler: CountingSampler) -> None:
    ids, mask = sampler._prompts(5, SamplingConfig(prompts=["ab", "cdef"]), seed=0)
    rows = [sampler.tokenizer.decode(r[m.bool()][1:]) for r, m in zip(ids, mask)]
    assert sorted(set(rows)) == ["ab", "cdef"] and rows[0] != rows[1]
    assert ids.shape == (5, 5) and (mask.sum(1) == torch.tensor([len(r) + 1 for r in rows])).all()


def test_teacher_samples_outside_a_run_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="needs the teacher to sample from"):
        TeacherSamplesSource(DataSource(source="builtin:teacher-samples"), None)


def test_apply_samples_from_the_teacher(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    from surgery.options import ApplyOptions
    from surgery.pipeline import Run

    recipe = Recipe.load("recipes/tiny.yaml", [
        "data.sources=[{source: builtin:teacher-samples, sampling: {length: 40, batch_size: 8}}, builtin:python-docs]",
        "stages.stage1.tokens=256", "stages.stage2.tokens=256", "stages.stage3.tokens=256", "verify.tokens=128",
        "data.seq_len=32",
    ])
    run = Run(recipe, ApplyOptions(out=str(tmp_path / "out")))
    run.setup()
    sources = {s["source"]: s for s in run.corpus.summary()["sources"]}
    assert sources["builtin:teacher-samples"]["train_tokens"] > 0 and sources["builtin:python-docs"]["train_tokens"] > 0
    times = run.clock.to_dict()  # generation is timed on its own, apart from the rest of the data build
    assert times["teacher_samples"] > 0 and times["data"] > 0 and times["teacher"] > 0
