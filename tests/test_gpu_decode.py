"""GPU: the CUDA-graph-captured decode step against the eager forward (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.graph_decode import GraphedDecoder
from surgery.hf_conventions import output_cache
from surgery.random_models import random_model
from surgery.recipe import ReplaceRule
from surgery.rewriter import rewrite

pytestmark = pytest.mark.gpu


def test_captured_greedy_decode_equals_generate(cuda: torch.device) -> None:
    model = rewrite(random_model("llama"), [ReplaceRule(mixer="discrete_mamba2", params={"chunk_size": 16})])[0]
    model = model.to(cuda)
    ids = torch.randint(4, 260, (2, 37), device=cuda)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0,
                              eos_token_id=None)  # never stop early: the decoder does not
        out = model(ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        dec = GraphedDecoder(model, output_cache(out), token, greedy=True, capture=True)
        assert dec.graph is not None
        tokens, logits = [token], [out.logits[:, -1]]
        for _ in range(11):
            logits.append(dec())
            tokens.append(dec.next_ids.clone())
    assert torch.equal(torch.cat(tokens, 1), want.sequences[:, 37:])
    assert (torch.stack(logits, 1) - torch.stack(want.logits, 1)).abs().max() < 1e-4


def test_generate_text_with_cuda_graph_matches_eager(cuda: torch.device, tmp_path: Path) -> None:
    import surgery
    from surgery.generate import generate_text
    from surgery.options import GenerateOptions
    from surgery.tokenizers import byte_tokenizer

    model, plan = rewrite(random_model("llama"), [ReplaceRule(mixer="discrete_mamba2")])
    surgery.save(model, tmp_path / "s", tokenizer=byte_tokenizer(), plan=plan)
    texts = [generate_text(str(tmp_path / "s"), "def fib(n):", GenerateOptions(max_new_tokens=24, device="cuda",
                                                                              cuda_graph=flag), stream=None)
             for flag in (False, True)]
    assert texts[0] == texts[1]
