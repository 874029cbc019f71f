"""Loading a saved student through transformers' AutoModelForCausalLM (trust_remote_code) equals surgery.load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import surgery
from surgery.errors import StudentError
from surgery.random_models import random_model
from surgery.recipe import ReplaceRule
from surgery.rewriter import rewrite
from surgery.student.auto_class import AUTO_CODE, auto_load
from surgery.tokenizers import byte_tokenizer


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A hybrid llama student (layers 0-2 mixers, 3 kept) saved to a directory."""
    model, plan = rewrite(random_model("llama"), [ReplaceRule(layers="0:3", mixer="discrete_mamba2")])
    path = surgery.save(model, tmp_path / "auto_student", tokenizer=byte_tokenizer(), plan=plan)
    return path, model.eval()


def test_auto_model_with_remote_code_is_the_student(saved: tuple[Path, torch.nn.Module]) -> None:
    path, model = saved
    assert (path / AUTO_CODE).is_file()
    auto = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto")
    assert type(auto.model.layers[0].self_attn).__name__ == "DiscreteMamba2"
    assert type(auto.model.layers[3].self_attn).__name__ == "LlamaAttention"
    ids = torch.randint(4, 260, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, model(ids).logits)
        out = auto.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 17)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("abc")["input_ids"]


def test_auto_model_dtype_and_device(saved: tuple[Path, torch.nn.Module]) -> None:
    path, _ = saved
    auto = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float64,
                                                 device_map={"": "cpu"})  # as lm-eval-harness passes it
    assert {p.dtype for p in auto.parameters()} == {torch.float64}
    assert {p.device.type for p in auto.parameters()} == {"cpu"}


def test_without_remote_code_transformers_builds_attention(saved: tuple[Path, torch.nn.Module]) -> None:
    """What the card warns about: without trust_remote_code the family's own class loads, mixers missing."""
    path, _ = saved
    plain = AutoModelForCausalLM.from_pretrained(path)
    assert type(plain.model.layers[0].self_attn).__name__ == "LlamaAttention"


@pytest.mark.parametrize("kwargs, named", [({"load_in_8bit": True}, "load_in_8bit"),
                                           ({"device_map": {"model.embed_tokens": 0, "lm_head": "cpu"}}, "device_map")])
def test_unsupported_keywords_are_named(saved: tuple[Path, torch.nn.Module], kwargs: dict, named: str) -> None:
    with pytest.raises(StudentError, match=named):
        auto_load(saved[0], **kwargs)


def test_keywords_left_at_their_defaults_are_accepted(saved: tuple[Path, torch.nn.Module]) -> None:
    model = auto_load(saved[0], quantization_config=None, gguf_file=None, max_memory=None, load_in_8bit=False,
                      revision="main", trust_remote_code=True)
    assert type(model.model.layers[0].self_attn).__name__ == "DiscreteMamba2"
