"""``model.generate`` through the static decode step (uncaptured on CPU): tokens, EOS, padding, refusals."""

from __future__ import annotations

import pytest
import torch

from surgery.graph_generate import MIN_NEW_TOKENS, fast_path_reason, graph_generate
from surgery.random_models import random_model
from surgery.recipe import ReplaceRule
from surgery.rewriter import rewrite

pytestmark = pytest.mark.hf_contract  # generate's conventions (.ci/run also runs these on other transformers)


def student(mixer: str = "discrete_mamba2", keep: list[int] | None = None, family: str = "llama") -> torch.nn.Module:
    rules = ([ReplaceRule(layers=keep, mixer="keep")] if keep else []) + [ReplaceRule(mixer=mixer, params={"chunk_size": 16})]
    return rewrite(random_model(family), rules)[0].eval()


def prompt(b: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 260, (b, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("mixer", "keep", "family"), [("discrete_mamba2", None, "llama"), ("mamba2", None, "llama"),
                                                       ("discrete_mamba2", [1], "llama"), ("discrete_mamba2", None, "gpt2")])
def test_greedy_tokens_equal_generate(mixer: str, keep: list[int] | None, family: str) -> None:
    model, ids = student(mixer, keep, family), prompt()
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        want = model.generate(ids, cuda_graph=False, **kw)
    got = graph_generate(model, ids, kw, capture=False)
    assert torch.equal(got, want)


def test_compile_step_is_checked_before_any_work() -> None:
    model, ids = student(), prompt()
    with pytest.raises(ValueError, match="compile='fast'"):
        model.generate(ids, compile_step="fast", max_new_tokens=4)
    with pytest.raises(ValueError, match="cuda_graph=False turns off"):
        model.generate(ids, compile_step=True, cuda_graph=False, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"generate\(compile_step='tuned'\): the captured decode step does not apply: "
                                         "it needs a CUDA device"):  # asked for, so never a silent fallback
        model.generate(ids, compile_step="tuned", max_new_tokens=12)


@pytest.mark.slow  # inductor on CPU: ~25 s cold for the two compiles
def test_compiled_step_is_shared_by_later_calls_of_other_lengths() -> None:
    """Compiled greedy decoding equals generate; a second prompt length compiles once more (the length made
    symbolic), a third length and a repeat compile nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # what earlier tests compiled (and the lengths they saw) must not count here
    model = rewrite(random_model("llama", num_hidden_layers=1), [ReplaceRule(mixer="discrete_mamba2",
                                                                             params={"chunk_size": 16})])[0].eval()
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    graphs = []
    for length in (7, 9, 12, 7):
        ids = prompt(b=1, length=length, seed=length)
        with torch.no_grad():
            want = model.generate(ids, cuda_graph=False, **kw)
        assert torch.equal(graph_generate(model, ids, kw, capture=False, compile=True), want)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > graphs[0] > 0  # the second length recompiled ...
    assert graphs[3] == graphs[2] == graphs[1]  # ... and nothing after it did


def test_eos_stops_rows_and_pads_them_like_generate() -> None:
    model, ids = student(), prompt(b=3, seed=1)
    with torch.no_grad():
        free = model.generate(ids, cuda_graph=False, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 3])  # row 0 emits it at its 4th new token
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 7, "eos_token_id": eos}
    with torch.no_grad():
        want = model.generate(ids, cuda_graph=False, **kw)
    got = graph_generate(model, ids, kw, capture=False)
    assert torch.equal(got, want)
    assert (got[0, ids.shape[1] + 4:] == 7).all()


def test_left_padded_batch_equals_generate() -> None:
    model, ids = student(), prompt(b=2, length=9, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = {"attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        want = model.generate(ids, cuda_graph=False, **kw)
    assert torch.equal(graph_generate(model, ids, kw, capture=False), want)


def test_sampling_is_seeded_and_respects_top_k() -> None:
    model, ids = student(), prompt(b=1)
    kw = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.8, "top_k": 1, "pad_token_id": 0, "eos_token_id": None}
    greedy = graph_generate(model, ids, {**kw, "do_sample": False}, capture=False)
    assert torch.equal(graph_generate(model, ids, kw, capture=False), greedy)  # top_k = 1 is greedy
    kw.update(top_k=0, top_p=0.9, temperature=1.5)
    torch.manual_seed(3)
    a = graph_generate(model, ids, kw, capture=False)
    torch.manual_seed(3)
    assert torch.equal(graph_generate(model, ids, kw, capture=False), a)


def test_reasons_name_what_is_not_supported() -> None:
    model, ids = student(), prompt()
    assert fast_path_reason(model, ids, {"max_new_tokens": 32}) == "it needs a CUDA device"
    assert "CUDA" in fast_path_reason(random_model("llama"), ids, {})  # a teacher: the device is checked first
    with pytest.raises(ValueError, match="cuda_graph=True.*CUDA device"):
        model.generate(ids, max_new_tokens=16, cuda_graph=True)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # the default falls back on CPU
    assert out.shape == (2, ids.shape[1] + 4)


def test_reasons_on_a_device_that_passes_the_device_check(monkeypatch) -> None:
    """The option checks, past the device check (faked: these run on CPU)."""
    import surgery.graph_generate as gg

    model, ids = student(), prompt()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert gg.fast_path_reason(model, ids, {"max_new_tokens": 32, "do_sample": True, "top_p": 0.9}) is None
    assert "num_beams" in gg.fast_path_reason(model, ids, {"max_new_tokens": 32, "num_beams": 2})
    assert "repetition_penalty" in gg.fast_path_reason(model, ids, {"max_new_tokens": 32, "repetition_penalty": 1.3})
    assert "logits_processor" in gg.fast_path_reason(model, ids, {"max_new_tokens": 32, "logits_processor": []})
    assert "too few" in gg.fast_path_reason(model, ids, {"max_new_tokens": MIN_NEW_TOKENS - 1})
    assert "streamer" in gg.fast_path_reason(model, ids, {"max_new_tokens": 32, "streamer": object()})
    assert "teacher" in gg.fast_path_reason(random_model("llama"), ids, {"max_new_tokens": 32})
