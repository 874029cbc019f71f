"""Held-out metrics on tiny random models (the same code path as for the real teacher)."""

from __future__ import annotations

import math

import pytest
import torch

from surgery.evaluate import english_perplexity, mean_nll, perplexity, top1_agreement
from surgery.random_models import random_model


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(4, 260, (2, 24), generator=gen) for _ in range(3)]  # (b, L) byte ids


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return random_model("llama")


def test_perplexity_matches_hf_loss(llama: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    model = llama
    losses = [model(input_ids=b, labels=b).loss.item() for b in batches]  # equal sizes: mean of means
    nll, count = mean_nll(model, batches)
    assert count == 3 * 2 * 23
    assert nll == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert perplexity(model, batches) == pytest.approx(math.exp(nll), rel=1e-9)


def test_random_model_is_near_uniform(batches: list[torch.Tensor]) -> None:
    ppl = perplexity(random_model("gpt2"), batches)
    assert 100 < ppl < 1000  # vocabulary 320


def test_top1_agreement(llama: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    a, b = llama, random_model("llama", seed=1)
    assert top1_agreement(a, a, batches) == 1.0
    assert top1_agreement(a, b, batches) < 0.5


def test_training_mode_restored(batches: list[torch.Tensor]) -> None:
    model = random_model("qwen2").train()
    perplexity(model, batches)
    assert model.training


def test_english_perplexity_random_model(llama: torch.nn.Module) -> None:
    from surgery.tokenizers import byte_tokenizer

    ppl = english_perplexity(llama, byte_tokenizer(), tokens=256, seq_len=64)
    assert ppl > 100
