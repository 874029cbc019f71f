"""Block graphs: tracing every family, stable keys, networkx views, the splice check."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

from surgery.graph import capture_block_call, check_splice, trace_block, trace_model
from surgery.random_models import FAMILIES, random_model

pytestmark = pytest.mark.hf_contract  # also run on the oldest supported and the newest transformers (.ci/run)



@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trace_every_family(family: str) -> None:
    model = random_model(family)
    mg = trace_model(model)
    assert len(mg.blocks) == 4
    block = mg.blocks[2]
    g = block.to_networkx()
    assert nx.is_directed_acyclic_graph(g)
    attn = g.nodes[block.attention]
    assert attn["op"] == "call_module" and attn["kind"] == "attention"
    assert attn["params"] == sum(p.numel() for p in model.get_submodule(block.attention).parameters())
    assert f"{block.path}::in:hidden_states" in g and f"{block.path}::out" in g
    assert nx.has_path(g, f"{block.path}::in:hidden_states", f"{block.path}::out")
    # no FX-generated names in keys: every key is a module path or block-prefixed
    assert all(k.startswith(block.path) for k in g)
    whole = mg.to_networkx()
    assert nx.is_directed_acyclic_graph(whole)
    assert nx.has_path(whole, mg.embeddings[0], mg.head)
    assert mg.params()["total"] == sum(p.numel() for p in model.parameters())


def test_keys_are_stable_across_copies_and_layers() -> None:
    a, b = random_model("phi"), random_model("phi", seed=7)
    ka = set(trace_block(a, 1).to_networkx())
    kb = set(trace_block(b, 1).to_networkx())
    assert ka == kb
    # the same module called twice (phi's resid_dropout) gets '#1'
    assert "model.layers.1.resid_dropout#1" in ka
    k0 = {k.replace("layers.0", "layers.1") for k in trace_block(a, 0).to_networkx()}
    assert k0 == ka


def test_leaves_attention_traces_into_mlp() -> None:
    model = random_model("llama")
    fine = trace_block(model, 0, leaves="attention").to_networkx()
    assert "model.layers.0.mlp.gate_proj" in fine
    assert "model.layers.0.self_attn.q_proj" not in fine  # attention stays opaque


def test_meta_model_traces() -> None:
    from transformers import AutoModelForCausalLM

    cfg = random_model("qwen2").config
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    g = trace_model(meta).to_networkx()
    assert g.nodes["model.layers.0.self_attn"]["params"] > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fx_graph_equals_eager_layer(family: str) -> None:
    """Teacher self-check: the traced graph computes the layer as the model calls it."""
    model = random_model(family)
    check = check_splice(trace_block(model, 1), model)
    assert check.ok and check.teacher_max_abs_diff == 0.0


def test_capture_block_call_mask_and_positions() -> None:
    model = random_model("llama")
    call = capture_block_call(model, 2, torch.randint(3, 300, (2, 6)))
    assert call.hidden_states.shape == (2, 6, 64)
    assert call.position_embeddings is not None and call.position_embeddings[0].shape[:2] == (1, 6)
    assert call.attention_mask is None or call.attention_mask.shape[-2:] == (6, 6)


def test_retarget_binds_new_module() -> None:
    model = random_model("llama")
    block = trace_block(model, 0)

    class Zero(torch.nn.Module):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003
            return torch.zeros_like(kwargs["hidden_states"]), None

    call = capture_block_call(model, 0, torch.randint(3, 300, (1, 5)))
    out = block.run(call, block.retarget({block.attention: Zero()}))
    layer = model.model.layers[0]
    h = call.hidden_states
    expected = h + layer.mlp(layer.post_attention_layernorm(h))  # attention contributes nothing
    torch.testing.assert_close(out, expected)


def test_check_splice_with_a_student_layer() -> None:
    import copy

    from placeholder_mixer import PlaceholderLinear

    teacher = random_model("gpt_neox")
    block = trace_block(teacher, 3)
    layer = copy.deepcopy(teacher.gpt_neox.layers[3])
    params = PlaceholderLinear.params_model(n_heads=4, head_dim=16, d_state=8)
    layer.attention = PlaceholderLinear(64, params, 3).eval()
    check = check_splice(block, layer)
    assert check.ok and check.layer == 3
