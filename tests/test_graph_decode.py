"""The static decode step behind CUDA-graph decoding (eager on CPU) and its refusals."""

from __future__ import annotations

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.generate import next_token
from surgery.graph_decode import GraphedDecoder, StaticDecoder, compile_options, graph_unsupported_reason
from surgery.hf_conventions import output_cache
from surgery.options import GenerateOptions
from surgery.random_models import random_model
from surgery.recipe import ReplaceRule
from surgery.rewriter import rewrite

pytestmark = pytest.mark.hf_contract  # also run on the oldest supported and the newest transformers (.ci/run)

FULL = [ReplaceRule(mixer="discrete_mamba2", params={"chunk_size": 16})]


def student(family: str = "llama", rules: list[ReplaceRule] = FULL) -> torch.nn.Module:
    return rewrite(random_model(family), rules)[0]


@pytest.mark.parametrize("greedy_inside", [True, False])
def test_static_steps_equal_generate(greedy_inside: bool) -> None:
    model = student()
    ids = torch.randint(4, 260, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0,
                              eos_token_id=None)  # never stop early: the decoder does not
        out = model(ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        dec = GraphedDecoder(model, output_cache(out), token, greedy=greedy_inside, capture=False)
        tokens, logits = [token], [out.logits[:, -1]]
        for _ in range(5):
            step = dec(None if greedy_inside else token)
            token = dec.next_ids.clone() if greedy_inside else step.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step)
    assert torch.equal(torch.cat(tokens, 1), want.sequences[:, 11:])
    assert (torch.stack(logits, 1) - torch.stack(want.logits, 1)).abs().max() < 1e-4


def greedy_pair(model: torch.nn.Module, ids: torch.Tensor, new: int, attention_mask: torch.Tensor | None = None,
                **decoder_kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, GraphedDecoder]:
    """(static tokens, generate's tokens, static logits, generate's logits, decoder) over ``new`` greedy tokens."""
    length = ids.shape[1]
    with torch.no_grad():
        want = model.generate(ids, attention_mask=attention_mask, max_new_tokens=new, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        prefill = {} if attention_mask is None else {"attention_mask": attention_mask,
                                                     "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}
        out = model(ids, use_cache=True, **prefill)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        dec = GraphedDecoder(model, output_cache(out), token, greedy=True, capture=False, max_len=length + new,
                             attention_mask=attention_mask, **decoder_kw)
        tokens, logits = [token], [out.logits[:, -1]]
        for _ in range(new - 1):
            logits.append(dec())
            tokens.append(dec.next_ids.clone())
    return torch.cat(tokens, 1), want.sequences[:, length:], torch.stack(logits, 1), torch.stack(want.logits, 1), dec


def keep(layers: list[int], mixer: str = "discrete_mamba2") -> list[ReplaceRule]:
    return [ReplaceRule(layers=layers, mixer="keep"), ReplaceRule(mixer=mixer, params={"chunk_size": 16})]


@pytest.mark.parametrize(("family", "rules", "attn"), [
    ("gpt2", FULL, None),  # learned absolute positions, fed from the step's own position buffer
    ("opt", [ReplaceRule(mixer="mamba2", params={"chunk_size": 16})], None),
    ("gpt2", keep([1]), None),  # hybrids: fixed-size KV for the kept layers
    ("opt", keep([0, 3], "mamba2"), "sdpa"),
    ("llama", keep([2]), None),
    ("llama", keep([0, 1], "mamba2"), "sdpa"),
])
def test_learned_positions_and_hybrids_equal_generate(family: str, rules: list[ReplaceRule], attn: str | None) -> None:
    model = student(family, rules)
    if attn:
        model.set_attn_implementation(attn)
    assert graph_unsupported_reason(model) is None
    ids = torch.randint(4, 260, (2, 9), generator=torch.Generator().manual_seed(1))
    tokens, want, logits, want_logits, _ = greedy_pair(model, ids, 18)
    assert torch.equal(tokens, want)
    assert (logits - want_logits).abs().max() < 1e-4


def test_left_padded_hybrid_equals_generate() -> None:
    model = student("gpt2", keep([1]))
    ids = torch.randint(4, 260, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1: four pad tokens on the left
    ids[1, :4] = 0
    tokens, want, logits, want_logits, _ = greedy_pair(model, ids, 16, attention_mask=mask)
    assert torch.equal(tokens, want)
    assert (logits - want_logits).abs().max() < 1e-4


@pytest.mark.slow  # 20-30 s on 2 CPU cores with a cold inductor cache (6 s warm)
def test_compiled_static_step_equals_generate() -> None:
    """torch.compile (inductor on CPU) of the step of a hybrid with learned positions: same greedy tokens."""
    model = rewrite(random_model("gpt2", n_layer=2), keep([1]))[0]  # two layers: less to compile
    ids = torch.randint(4, 260, (1, 7), generator=torch.Generator().manual_seed(3))
    tokens, want, logits, want_logits, dec = greedy_pair(model, ids, 16, compile=True)
    assert dec.compile_error is None and dec.step.compiled
    assert torch.equal(tokens, want)
    assert (logits - want_logits).abs().max() < 1e-4


def test_compile_modes_name_inductor_options_and_refuse_unknown_ones() -> None:
    assert compile_options(False) is None and compile_options(True) == {}
    assert compile_options("tuned") == {"coordinate_descent_tuning": True}
    for bad in ("max", 1, 0, None):
        with pytest.raises(ValueError, match="compile="):
            compile_options(bad)
    with pytest.raises(ValueError, match="compile='fast'"):  # refused before anything is compiled
        StaticDecoder(student(), None, torch.zeros(1, 1, dtype=torch.long), compile="fast")


def test_unsupported_students_are_refused_with_a_reason() -> None:
    assert graph_unsupported_reason(student()) is None
    assert graph_unsupported_reason(student(rules=keep([0]))) is None
    assert graph_unsupported_reason(student("gpt2")) is None
    assert "no SSM mixers" in graph_unsupported_reason(random_model("llama"))
    for family in ("gpt_neo", "gemma3_text"):  # local / sliding-window kept layers
        assert "not full attention" in graph_unsupported_reason(student(family, keep([1])))
    with pytest.raises(ValueError, match="cannot graph-capture"):
        GraphedDecoder(random_model("llama"), None, torch.zeros(1, 1, dtype=torch.long))


def test_hybrid_needs_max_len_and_stops_when_full() -> None:
    model = student(rules=keep([1]))
    ids = torch.randint(4, 260, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        with pytest.raises(ValueError, match="give max_len"):
            GraphedDecoder(model, output_cache(out), token, capture=False)
        dec = GraphedDecoder(model, output_cache(out), token, greedy=True, capture=False, max_len=7)
        dec(), dec()  # tokens 6 and 7
        with pytest.raises(ValueError, match="holds 7 tokens"):
            dec()


def test_next_token_greedy_and_nucleus() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(next_token(logits, GenerateOptions()), logits.argmax(-1, keepdim=True))
    tiny_nucleus = GenerateOptions(temperature=1.0, top_p=1e-6)  # only the top token survives
    assert torch.equal(next_token(logits, tiny_nucleus, torch.Generator().manual_seed(0)), logits.argmax(-1, keepdim=True))
    sampled = next_token(logits, GenerateOptions(temperature=1.0), torch.Generator().manual_seed(0))
    assert sampled.shape == (3, 1) and ((0 <= sampled) & (sampled < 50)).all()


def test_generate_says_why_the_graph_does_not_apply() -> None:
    from surgery.generate import graph_decode_reason

    ids = torch.zeros(1, 3, dtype=torch.long)
    assert graph_decode_reason(student(), ids) == "it needs a CUDA device"
    if torch.cuda.is_available():
        assert "no SSM mixers" in graph_decode_reason(random_model("llama").cuda(), ids.cuda())


def test_cli_flag_needs_cuda(tmp_path) -> None:
    import surgery
    from surgery.generate import generate_text
    from surgery.tokenizers import byte_tokenizer

    model, plan = rewrite(random_model("llama"), FULL)
    surgery.save(model, tmp_path / "s", tokenizer=byte_tokenizer(), plan=plan)
    with pytest.raises(SurgeryError, match="needs a CUDA device"):
        generate_text(str(tmp_path / "s"), "def f", GenerateOptions(cuda_graph=True, device="cpu"), stream=None)


@pytest.mark.parametrize("mixer", ["discrete_mamba2", "mamba2"])
def test_fused_decode_projections_equal_the_separate_ones(mixer: str) -> None:
    """The decoder's stacked input projections (one matmul a step) give the separate projections' steps."""
    model = student("llama", [ReplaceRule(mixer=mixer, params={"chunk_size": 16, "bias": True})])
    ids = torch.randint(4, 260, (2, 9), generator=torch.Generator().manual_seed(3))
    runs = {}
    with torch.no_grad():
        for fuse in (True, False):
            out = model(ids, use_cache=True)
            dec = GraphedDecoder(model, output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True), greedy=True,
                                 capture=False, fuse=fuse)
            assert dec.step.fused == (len(model.model.layers) if fuse else 0)
            runs[fuse] = torch.stack([dec() for _ in range(5)], 1)  # (b, 5, V)
    assert (runs[True] - runs[False]).abs().max() < 1e-5 * runs[False].abs().max()
    assert torch.equal(runs[True].argmax(-1), runs[False].argmax(-1))


def test_fused_projection_stacks_weights_and_fills_missing_biases() -> None:
    from surgery.mixers._common import FusedProjection, project

    g = torch.Generator().manual_seed(5)
    linears = [torch.nn.Linear(6, 4), torch.nn.Linear(6, 3, bias=False), torch.nn.Linear(6, 2)]
    for lin in linears:
        torch.nn.init.normal_(lin.weight, generator=g)
    u = torch.randn(2, 1, 6, generator=g, dtype=torch.float32)
    fused = FusedProjection.of(linears)
    assert fused.weight.shape == (9, 6) and fused.sizes == (4, 3, 2) and torch.equal(fused.bias[4:7], torch.zeros(3))
    for got, want in zip(project(u, linears, fused), project(u, linears, None)):
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert FusedProjection.of(linears[1:2]).bias is None
