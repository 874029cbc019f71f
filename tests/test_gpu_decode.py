"""GPU: the CUDA-graph-captured (and compiled + captured) decode step against eager generate (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.graph_decode import GraphedDecoder, graph_unsupported_reason
from surgery.hf_conventions import output_cache
from surgery.random_models import random_model
from surgery.recipe import ReplaceRule
from surgery.rewriter import rewrite

pytestmark = pytest.mark.gpu

NEW = 16  # greedy tokens compared


def rules(mixer: str, kept: list[int] = ()) -> list[ReplaceRule]:
    keep = [ReplaceRule(layers=list(kept), mixer="keep")] if kept else []
    return [*keep, ReplaceRule(mixer=mixer, params={"chunk_size": 16})]


STUDENTS = {  # name -> (family, rules)
    "llama-discrete_mamba2": ("llama", rules("discrete_mamba2")),
    "llama-mamba2": ("llama", rules("mamba2")),
    "llama-hybrid": ("llama", rules("discrete_mamba2", [1])),
    "gpt2-discrete_mamba2": ("gpt2", rules("discrete_mamba2")),  # learned absolute positions
    "gpt2-hybrid-mamba2": ("gpt2", rules("mamba2", [0, 2])),
}


def decode(model: torch.nn.Module, ids: torch.Tensor, *, compile: bool | str, forced: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, GraphedDecoder]:
    """Prefill eagerly, then NEW - 1 captured steps: greedy inside the graph, or fed ``forced (b, NEW)`` tokens."""
    out = model(ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True) if forced is None else forced[:, :1]
    dec = GraphedDecoder(model, output_cache(out), token, greedy=forced is None, capture=True,
                         max_len=ids.shape[1] + NEW, compile=compile)
    assert dec.graph is not None and dec.compile_error is None
    tokens, logits = [token], [out.logits[:, -1]]
    for i in range(1, NEW):
        logits.append(dec(None if forced is None else forced[:, i - 1 : i]))
        tokens.append(dec.next_ids.clone() if forced is None else forced[:, i : i + 1])
    return torch.cat(tokens, 1), torch.stack(logits, 1).float(), dec


@pytest.mark.parametrize("compile", [False, True], ids=["captured", "compiled"])
@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_captured_greedy_decode_equals_generate_fp32(cuda: torch.device, name: str, compile: bool) -> None:
    family, student_rules = STUDENTS[name]
    model = rewrite(random_model(family), student_rules)[0].to(cuda)
    assert graph_unsupported_reason(model) is None
    ids = torch.randint(4, 260, (2, 37), device=cuda, generator=torch.Generator(cuda).manual_seed(0))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0,
                              eos_token_id=None)  # never stop early: the decoder does not
        tokens, logits, _ = decode(model, ids, compile=compile)
    assert torch.equal(tokens, want.sequences[:, 37:])
    assert (logits - torch.stack(want.logits, 1)).abs().max() < (1e-3 if compile else 1e-4)


@pytest.mark.parametrize("name", ["llama-discrete_mamba2", "llama-hybrid"])
def test_tuned_compile_at_batch_1_equals_generate_fp32(cuda: torch.device, name: str) -> None:
    """compile="tuned" at batch 1, where inductor turns each one-row matmul into a fused reduction."""
    family, student_rules = STUDENTS[name]
    model = rewrite(random_model(family), student_rules)[0].to(cuda)
    ids = torch.randint(4, 260, (1, 29), device=cuda, generator=torch.Generator(cuda).manual_seed(2))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        tokens, logits, dec = decode(model, ids, compile="tuned")
    assert dec.step.compiled
    assert torch.equal(tokens, want.sequences[:, 29:])
    assert (logits - torch.stack(want.logits, 1)).abs().max() < 1e-3


def test_generate_with_compile_step_equals_eager_generate(cuda: torch.device) -> None:
    """``model.generate(compile_step="tuned")`` on CUDA: the compiled, captured step gives eager generate's tokens."""
    family, student_rules = STUDENTS["llama-hybrid"]
    model = rewrite(random_model(family), student_rules)[0].to(cuda)
    ids = torch.randint(4, 260, (1, 23), device=cuda, generator=torch.Generator(cuda).manual_seed(3))
    kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        want = model.generate(ids, cuda_graph=False, **kw)
        got = model.generate(ids, cuda_graph=True, compile_step="tuned", **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("compile", [False, True], ids=["captured", "compiled"])
@pytest.mark.parametrize("name", ["llama-hybrid", "gpt2-discrete_mamba2"])
def test_captured_decode_bf16_within_tolerance(cuda: torch.device, name: str, compile: bool) -> None:
    """bf16: fed generate's tokens, every step's logits stay within bf16 tolerance of generate's."""
    family, student_rules = STUDENTS[name]
    model = rewrite(random_model(family), student_rules)[0].to(cuda, torch.bfloat16)
    ids = torch.randint(4, 260, (2, 37), device=cuda, generator=torch.Generator(cuda).manual_seed(1))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        forced = want.sequences[:, 37:]  # (b, NEW)
        _, logits, _ = decode(model, ids, compile=compile, forced=forced)
    reference = torch.stack(want.logits, 1).float()  # (b, NEW, V)
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_generate_text_with_cuda_graph_matches_eager(cuda: torch.device, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery
    import surgery.graph_decode
    from surgery.generate import generate_text
    from surgery.options import GenerateOptions
    from surgery.tokenizers import byte_tokenizer

    built: list[bool] = []
    init = surgery.graph_decode.GraphedDecoder.__init__

    def counting(self: GraphedDecoder, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        built.append(self.graph is not None)

    monkeypatch.setattr(surgery.graph_decode.GraphedDecoder, "__init__", counting)
    for name, student_rules in (("full", [ReplaceRule(mixer="discrete_mamba2")]), ("hybrid", rules("mamba2", [1]))):
        model, plan = rewrite(random_model("llama"), student_rules)
        surgery.save(model, tmp_path / name, tokenizer=byte_tokenizer(), plan=plan)
        opts = GenerateOptions(max_new_tokens=24, device="cuda")
        eager = generate_text(str(tmp_path / name), "def fib(n):", opts, stream=None, graph=False)
        default = generate_text(str(tmp_path / name), "def fib(n):", opts, stream=None)  # the graph by default
        required = generate_text(str(tmp_path / name), "def fib(n):", GenerateOptions(max_new_tokens=24, device="cuda",
                                                                                      cuda_graph=True), stream=None)
        assert eager == default == required, name
    assert built == [True, True, True, True]  # default and required runs captured, graph=False did not build one


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_model_generate_takes_the_captured_step_by_default(cuda: torch.device, name: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.generate`` on CUDA: the captured step by default, generate's greedy tokens (left padding included)."""
    import surgery.graph_decode

    built: list[bool] = []
    init = surgery.graph_decode.GraphedDecoder.__init__

    def counting(self: GraphedDecoder, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        built.append(self.graph is not None)

    monkeypatch.setattr(surgery.graph_decode.GraphedDecoder, "__init__", counting)
    family, student_rules = STUDENTS[name]
    model = rewrite(random_model(family), student_rules)[0].to(cuda)
    ids = torch.randint(4, 260, (2, 37), device=cuda, generator=torch.Generator(cuda).manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 is left-padded
    kw = {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        eager = model.generate(ids, cuda_graph=False, **kw)
        assert built == []
        fast = model.generate(ids, **kw)
        required = model.generate(ids, cuda_graph=True, **kw)
    assert built == [True, True]
    assert torch.equal(fast, eager) and torch.equal(required, eager)
