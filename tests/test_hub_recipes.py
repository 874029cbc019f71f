"""The hub recipes plan correctly on their teachers' real architectures (meta device, no download).

The configs below are the published ``config.json`` values of the hub teachers (sizes only);
the models are built on the meta device, so nothing is downloaded or allocated.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from surgery.recipe import Recipe
from surgery.rewriter import plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

PHI_1_5 = dict(model_type="phi", vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
               num_attention_heads=32, partial_rotary_factor=0.5, max_position_embeddings=2048)
LLAMA_3_2_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072)


def meta_model(spec: dict) -> torch.nn.Module:
    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_phi_mamba_replaces_all_24_layers_with_32_head_mixers() -> None:
    recipe = Recipe.load(RECIPES / "phi_mamba.yaml")
    result = plan(meta_model(PHI_1_5), recipe.replace)
    replaced = [e for e in result.entries if e.mixer == "discrete_mamba2"]
    assert len(replaced) == 24
    assert all(e.params["n_v_heads"] == 32 and e.params["d_state"] == 64 and e.params["head_dim"] == 64
               for e in replaced)
    assert 1.4e9 < result.to_dict()["summary"]["params_after"] < 1.6e9  # Phi-Mamba-1.5B


def test_hybrid_phi_mamba_keeps_four_interleaved_attention_layers() -> None:
    recipe = Recipe.load(RECIPES / "hybrid_phi_mamba.yaml")
    assert recipe.stages.stage1.tokens == 80_216_064  # inherited from phi_mamba.yaml
    result = plan(meta_model(PHI_1_5), recipe.replace)
    kept = [e.layer for e in result.entries if e.mixer in (None, "keep")]
    assert kept == [3, 9, 15, 21]
    assert sum(e.mixer == "discrete_mamba2" for e in result.entries) == 20


def test_llamba_uses_grouped_query_layout() -> None:
    recipe = Recipe.load(RECIPES / "llamba_1b.yaml")
    result = plan(meta_model(LLAMA_3_2_1B), recipe.replace)
    assert len(result.entries) == 16
    assert all(e.params["n_qk_heads"] == 32 and e.params["n_b_heads"] == 8 for e in result.entries)


@pytest.mark.parametrize("layers", [list(range(0, 16, 2))])
def test_mamba_in_llama_half_the_layers_initialised_from_qkvo(layers: list[int]) -> None:
    recipe = Recipe.load(RECIPES / "mamba_in_llama.yaml")
    result = plan(meta_model(LLAMA_3_2_1B), recipe.replace)
    assert [e.layer for e in result.entries if e.mixer in (None, "keep")] == layers
    converted = [e for e in result.entries if e.mixer == "mamba2"]
    assert len(converted) == 8
    sources = " ".join(str(v) for e in converted for v in e.transfer.values())
    assert all(f"{name}_proj.weight" in sources for name in "qkvo")
