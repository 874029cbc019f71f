"""Shared fixtures: tiny random models of every family (never downloads)."""

from __future__ import annotations

import pytest
import torch

from surgery.random_models import FAMILIES, random_model

# Tests run in parallel workers (pytest -n 2 on 2 cores): one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)

ALL_FAMILIES = sorted(FAMILIES)
# The families the issues name as the minimum set (gemma3_text and opt are extra).
CORE_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi", "gpt_neox", "gpt2"]


@pytest.fixture(params=ALL_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Each supported family name in turn."""
    return request.param


@pytest.fixture
def tiny_model(family: str) -> torch.nn.Module:
    """A fresh tiny random model of ``family`` (float32, eval mode)."""
    return random_model(family)


@pytest.fixture
def cuda() -> torch.device:
    """The CUDA device; skips the test where there is none."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (run on the GPU machine)")
    return torch.device("cuda")
