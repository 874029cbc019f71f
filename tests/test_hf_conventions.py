"""Never silently wrong: a bypassed cache, a cache under an unknown name, or a lost state raises.

transformers 5.24 renamed the cache keyword (``past_key_values`` -> ``cache``); mixers that did not
know the new name ran without state and generated wrong text without an error. These tests play
the next such change on today's transformers: the cache handed over under a name nobody knows, or
dropped, or rebuilt between steps -- each must raise, never produce text.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from surgery.cache import MissingStateError, SurgeryCache, enable_recurrent_cache
from surgery.hf_conventions import (
    ATTENTION_CACHE_KEYWORDS,
    UnknownConventionError,
    attention_call_cache,
    cache_keyword,
    output_cache,
)
from surgery.mixers.base import Mixer
from surgery.mixers.testing import naive_student
from surgery.random_models import random_model

pytestmark = pytest.mark.hf_contract  # also run on the oldest supported and the newest transformers (.ci/run)


def student(family: str = "llama", layers: list[int] | None = None) -> nn.Module:
    model = naive_student(random_model(family), layers=layers, copy_model=False)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return enable_recurrent_cache(model).eval()


class RenamedCache(nn.Module):
    """Stands between a decoder layer and its mixer and changes how the cache is handed over."""

    def __init__(self, inner: nn.Module, how: str) -> None:
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, *args, **kwargs):
        cache = None
        for k in ATTENTION_CACHE_KEYWORDS:
            cache = kwargs.pop(k, None) if cache is None else cache
        if self.how == "rename" and cache is not None:
            kwargs["kv_state"] = cache  # a future keyword surgery does not know
        elif self.how == "drop":
            kwargs["use_cache"] = True  # the layer wants caching but hands nothing over
        elif self.how == "drop_silently":
            kwargs.pop("use_cache", None)  # like OPT / Gemma3: no use_cache reaches attention
        return self.inner(*args, **kwargs)


def splice(model: nn.Module, how: str) -> None:
    for layer in model.model.layers:
        if isinstance(layer.self_attn, Mixer):
            layer.self_attn = RenamedCache(layer.self_attn, how)


@pytest.mark.parametrize("how", ["rename", "drop", "drop_silently"])
@pytest.mark.parametrize("layers", [None, [1, 3]], ids=["full", "hybrid"])
def test_bypassed_cache_raises_instead_of_generating(how: str, layers: list[int] | None) -> None:
    model = student(layers=layers)
    ids = torch.randint(3, 300, (1, 6))
    reference = model.generate(ids, max_new_tokens=3, do_sample=False)  # works before the splice
    assert reference.shape == (1, 9)
    splice(model, how)
    error = UnknownConventionError if how in ("rename", "drop") else MissingStateError
    with pytest.raises(error, match="kv_state|use_cache=True|position"):
        model.generate(ids, max_new_tokens=3, do_sample=False)


def test_cache_rebuilt_between_steps_raises() -> None:
    model = student()
    ids = torch.randint(3, 300, (2, 6))
    key = cache_keyword(model.forward)
    first = model(ids, use_cache=True)
    nxt = first.logits[:, -1:].argmax(-1)
    positions = torch.full((2, 1), 6)
    # the right cache continues; a fresh one (or none) for the same positions is a lost state
    model(nxt, position_ids=positions, **{key: output_cache(first)})
    with pytest.raises(MissingStateError, match="position 6"):
        model(nxt, position_ids=positions, **{key: SurgeryCache()})
    with pytest.raises(MissingStateError, match="no cache"):
        model(nxt, position_ids=positions, use_cache=False)


def test_hybrid_cache_with_dropped_mixer_slot_raises() -> None:
    model = student(layers=[1, 2])  # layer 0 keeps attention: its KV survives, the mixers' state does not
    ids = torch.randint(3, 300, (1, 5))
    cache = output_cache(model(ids, use_cache=True))

    def kv_only() -> dict[str, DynamicCache]:
        kv = DynamicCache()
        kv.update(cache.layers[0].keys.clone(), cache.layers[0].values.clone(), 0)
        return {cache_keyword(model.forward): kv}

    with pytest.raises(MissingStateError, match="position 5 with a cache holding no state"):
        model(ids[:, -1:], **kv_only())  # eval mode: the positions give it away first
    model.train()  # training skips the position check (no host read); the cache's own bookkeeping still catches it
    with pytest.raises(MissingStateError, match="layer 1 is missing from a cache that has already seen 5 tokens"):
        model(ids[:, -1:], **kv_only())


def test_attention_call_cache_accepts_each_known_keyword_and_refuses_the_rest() -> None:
    cache = DynamicCache()
    for key in ATTENTION_CACHE_KEYWORDS:
        assert attention_call_cache((), {key: cache, "use_cache": True}) is cache
    assert attention_call_cache((), {"use_cache": False}) is None
    assert attention_call_cache((), {}) is None
    with pytest.raises(UnknownConventionError, match="keyword 'my_cache'"):
        attention_call_cache((), {"my_cache": cache})
    with pytest.raises(UnknownConventionError, match="positional argument 1"):
        attention_call_cache((cache,), {})
    with pytest.raises(UnknownConventionError, match="two caches"):
        attention_call_cache((), {"cache": cache, "past_key_values": DynamicCache()})
    with pytest.raises(UnknownConventionError, match="use_cache=True"):
        attention_call_cache((), {"use_cache": True})


def test_cache_keyword_and_output_cache() -> None:
    def new_style(input_ids=None, cache=None): ...
    def old_style(input_ids=None, past_key_values=None): ...
    def unknown(input_ids=None, state=None): ...

    assert cache_keyword(new_style) == "cache" and cache_keyword(old_style) == "past_key_values"
    with pytest.raises(UnknownConventionError, match="takes none of the cache keywords"):
        cache_keyword(unknown)
    model = student()
    assert cache_keyword(model.forward) in ("cache", "past_key_values")  # whichever the installed release uses
    out = model(torch.randint(3, 300, (1, 4)), use_cache=True)
    assert isinstance(output_cache(out), SurgeryCache)
    assert output_cache({"past_key_values": 1}) == 1 and output_cache({"cache": 2}) == 2 and output_cache({}) is None


def test_fresh_sequences_skips_only_the_continuation_check() -> None:
    """Training batches start at 0: inside fresh_sequences() the per-layer host read is skipped; outside it raises again."""
    from surgery.cache import fresh_sequences

    model = student()
    nxt, positions = torch.randint(3, 300, (2, 1)), torch.full((2, 1), 6)
    with fresh_sequences():
        model(nxt, position_ids=positions, use_cache=False)  # no check: the caller vouches for position 0 starts
    with pytest.raises(MissingStateError, match="no cache"):
        model(nxt, position_ids=positions, use_cache=False)
