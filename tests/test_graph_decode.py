"""The static decode step behind CUDA-graph decoding (eager on CPU) and its refusals."""

from __future__ import annotations

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.generate import next_token
from surgery.graph_decode import GraphedDecoder, graph_unsupported_reason
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


def test_unsupported_students_are_refused_with_a_reason() -> None:
    assert graph_unsupported_reason(student()) is None
    hybrid = student(rules=[ReplaceRule(layers=[0], mixer="keep"), *FULL])
    assert "keeps attention layers" in graph_unsupported_reason(hybrid)
    assert "learned absolute position" in graph_unsupported_reason(student("gpt2"))
    with pytest.raises(ValueError, match="cannot graph-capture"):
        GraphedDecoder(student("gpt2"), None, torch.zeros(1, 1, dtype=torch.long))


def test_next_token_greedy_and_nucleus() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(next_token(logits, GenerateOptions()), logits.argmax(-1, keepdim=True))
    tiny_nucleus = GenerateOptions(temperature=1.0, top_p=1e-6)  # only the top token survives
    assert torch.equal(next_token(logits, tiny_nucleus, torch.Generator().manual_seed(0)), logits.argmax(-1, keepdim=True))
    sampled = next_token(logits, GenerateOptions(temperature=1.0), torch.Generator().manual_seed(0))
    assert sampled.shape == (3, 1) and ((0 <= sampled) & (sampled < 50)).all()


def test_cli_flag_needs_cuda(tmp_path) -> None:
    import surgery
    from surgery.generate import generate_text
    from surgery.tokenizers import byte_tokenizer

    model, plan = rewrite(random_model("llama"), FULL)
    surgery.save(model, tmp_path / "s", tokenizer=byte_tokenizer(), plan=plan)
    with pytest.raises(SurgeryError, match="needs a CUDA device"):
        generate_text(str(tmp_path / "s"), "def f", GenerateOptions(cuda_graph=True, device="cpu"), stream=None)
