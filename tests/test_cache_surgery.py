"""SurgeryCache bookkeeping and enable_recurrent_cache."""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from surgery.cache import SurgeryCache, enable_recurrent_cache, mixer_layer_indices, surgery_cache
from surgery.hf_conventions import cache_keyword, output_cache
from surgery.mixers.testing import naive_student
from surgery.random_models import random_model, random_config

pytestmark = pytest.mark.hf_contract  # also run on the oldest supported and the newest transformers (.ci/run)


def student(family: str = "llama", layers: list[int] | None = None, mixer: str = "discrete_mamba2", enable: bool = True):
    model = naive_student(random_model(family), mixer=mixer, layers=layers, copy_model=False)
    return enable_recurrent_cache(model) if enable else model


def test_layout_from_config() -> None:
    cache = SurgeryCache(config=random_config("gemma3_text"), mixer_layers=[0, 2])
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds[0] == kinds[2] == "SSMCacheLayer"
    assert isinstance(cache.layers[1], DynamicSlidingWindowLayer)
    assert cache.is_linear == [True, False, True, False]
    assert not cache.is_compileable
    assert cache.get_seq_length() == 0 and cache.get_mask_sizes(5, 0) == (5, 0)


def test_state_slot_bookkeeping() -> None:
    cache = SurgeryCache()
    slot = cache.ssm_layer(2)
    assert len(cache.layers) == 3 and cache.ssm_layer(2) is slot
    b = 3
    rows = torch.arange(b).float()
    slot.store(rows.view(b, 1, 1, 1).expand(b, 2, 4, 5).clone(), rows.view(b, 1, 1).expand(b, 6, 3).clone(), 7)
    assert cache.get_seq_length(2) == 7 and cache.get_seq_length() == 7  # slot 0 is empty: defers to the others
    assert cache.get_mask_sizes(1, 2) == (8, 0)
    assert cache.has_previous_state(2)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert slot.ssm_state[:, 0, 0, 0].tolist() == [2, 2, 0] and slot.conv_state[:, 0, 0].tolist() == [2, 2, 0]
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert slot.ssm_state[:, 0, 0, 0].tolist() == [2, 0]
    cache.batch_repeat_interleave(2)
    assert slot.conv_state[:, 0, 0].tolist() == [2, 2, 0, 0]
    cache.reset()
    assert slot.ssm_state is None and cache.get_seq_length(2) == 0
    # a slot already holding attention KV cannot become a mixer slot
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    with pytest.raises(TypeError, match="fresh cache"):
        cache.ssm_layer(0)


def test_plain_dynamic_cache_is_upgraded_other_caches_raise() -> None:
    cache = DynamicCache()
    assert surgery_cache(cache) is cache and isinstance(cache, SurgeryCache)
    static = StaticCache(config=random_config("llama"), max_cache_len=16)
    with pytest.raises(TypeError, match="SurgeryCache"):
        surgery_cache(static)
    model = student(enable=False)
    with pytest.raises(TypeError, match="enable_recurrent_cache"):
        model(torch.randint(3, 300, (1, 4)), **{cache_keyword(model.forward): StaticCache(config=model.config, max_cache_len=16)})


def test_student_without_enable_still_decodes_correctly() -> None:
    model = student(layers=[1, 3], enable=False)  # model's own forward creates a DynamicCache: upgraded in place
    ids = torch.randint(3, 300, (2, 9))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :6], use_cache=True)
    assert isinstance(output_cache(out), SurgeryCache)
    step = model(ids[:, 6:], **{cache_keyword(model.forward): output_cache(out)}).logits
    assert (step - full[:, 6:]).abs().max() < 1e-5


def test_enable_recurrent_cache() -> None:
    model = student(layers=[0, 1])
    cls = type(model)
    assert cls.__name__ == "LlamaForCausalLM" and cls._is_stateful
    assert "position_ids" in inspect.signature(model.forward).parameters
    assert enable_recurrent_cache(model) is model and type(model) is cls  # idempotent
    assert mixer_layer_indices(model) == [0, 1]
    ids = torch.randint(3, 300, (1, 5))
    cache = output_cache(model(ids))
    assert isinstance(cache, SurgeryCache) and [type(x).__name__ for x in cache.layers][:2] == ["SSMCacheLayer"] * 2
    assert cache.get_seq_length() == 5
    assert output_cache(model(ids, use_cache=False)) is None
    # copies and saves as the original architecture (the project never unpickles; see test_student_safety)
    twin = copy.deepcopy(model)
    assert type(twin) is cls and torch.equal(twin(ids).logits, model(ids).logits)


def test_save_pretrained_keeps_architecture(tmp_path) -> None:
    model = student(layers=[0])
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_generate_refuses_static_cache_and_assisted_decoding() -> None:
    model = student()
    ids = torch.randint(3, 300, (1, 4))
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static", pad_token_id=0)
    with pytest.raises(ValueError, match="stateful"):
        model.generate(ids, max_new_tokens=2, assistant_model=random_model("llama"), pad_token_id=0)
    with pytest.raises(ValueError, match=r"prompt_lookup_num_tokens=\.\.\.\): assisted / speculative"):
        model.generate(ids, max_new_tokens=2, prompt_lookup_num_tokens=2, pad_token_id=0)


def test_model_without_mixers_is_untouched() -> None:
    model = random_model("gpt2")
    assert type(enable_recurrent_cache(model)).__module__.startswith("transformers")
