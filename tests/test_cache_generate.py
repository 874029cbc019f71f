"""Cached generation of students equals full recomputation (greedy, beams, left padding, hybrids)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery.cache import enable_recurrent_cache
from surgery.hf_conventions import output_cache
from surgery.mixers.testing import naive_student
from surgery.random_models import FAMILIES, random_model

pytestmark = pytest.mark.hf_contract  # also run on the oldest supported and the newest transformers (.ci/run)

ALL = sorted(FAMILIES)
CORE = ["llama", "phi", "gpt2"]
TOL = 1e-4


def make_student(family: str, mixer: str = "discrete_mamba2", layers: list[int] | None = None, enable: bool = True) -> nn.Module:
    """A random student: every mixer parameter perturbed (gate, conv, decay all non-trivial)."""
    model = naive_student(random_model(family), mixer=mixer, layers=layers, params={"chunk_size": 4}, copy_model=False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if any(k in name for k in ("z_proj", "conv_", "z_bias", "A_log_proj", "dt_proj")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.generation_config.eos_token_id = None  # fixed-length generations
    model.generation_config.pad_token_id = 0
    return enable_recurrent_cache(model) if enable else model


def prompt(b: int = 2, L: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (b, L), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_greedy(model: nn.Module, ids: torch.Tensor, new: int = 5, **kwargs: object) -> None:
    out = model.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)
    assert type(output_cache(out)).__name__ == "SurgeryCache"
    full = model(out.sequences, use_cache=False, **{k: v for k, v in kwargs.items() if k != "attention_mask"}).logits
    assert max_diff(torch.stack(out.logits, 1), full[:, ids.shape[1] - 1 : -1]) < TOL


@pytest.mark.parametrize("family", ALL)
def test_greedy_fully_converted(family: str) -> None:
    check_greedy(make_student(family), prompt())


@pytest.mark.parametrize("family", ALL)
def test_greedy_hybrid_mamba2(family: str) -> None:
    # layer 0 is a mixer (get_seq_length must come from the SSM slot), layers 1 and 3 keep attention
    check_greedy(make_student(family, "mamba2", layers=[0, 2]), prompt(seed=1))


def test_hybrid_past_the_sliding_window() -> None:
    # gemma3: layers 0-3 are sliding-window attention (window 16); keep two of them, prompt longer than the window
    check_greedy(make_student("gemma3_text", layers=[1, 2]), prompt(L=20, seed=2), new=4)


@pytest.mark.parametrize("family", CORE)
@pytest.mark.parametrize(("mixer", "layers"), [("discrete_mamba2", None), ("mamba2", [1, 2])])
def test_two_beams_cached_equals_uncached(family: str, mixer: str, layers: list[int] | None) -> None:
    model = make_student(family, mixer, layers)
    ids = prompt(seed=3)
    kw = {"max_new_tokens": 4, "num_beams": 2, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    cached = model.generate(ids, **kw)
    fresh = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, fresh.sequences)
    assert max_diff(cached.sequences_scores, fresh.sequences_scores) < TOL


@pytest.mark.parametrize("family", [*CORE, "opt", "gemma3_text"])
@pytest.mark.parametrize(("mixer", "layers"), [("discrete_mamba2", None), ("mamba2", [0, 2])])
def test_left_padded_batch_equals_unpadded_rows(family: str, mixer: str, layers: list[int] | None) -> None:
    model = make_student(family, mixer, layers)
    short, long = prompt(1, 4, seed=4), prompt(1, 7, seed=5)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch, attention_mask=mask, position_ids=positions, use_cache=False).logits
    assert max_diff(logits[0, 3:], model(short, use_cache=False).logits[0]) < TOL
    assert max_diff(logits[1], model(long, use_cache=False).logits[0]) < TOL
    kw = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    padded = model.generate(batch, attention_mask=mask, **kw)
    for row, ids in ((0, short), (1, long)):
        alone = model.generate(ids, **kw)
        assert torch.equal(padded.sequences[row, -4:], alone.sequences[0, -4:])
        assert max_diff(torch.stack(padded.logits, 1)[row], torch.stack(alone.logits, 1)[0]) < TOL
