"""diff: replaced nodes, parameters, transfers (from a plan or inferred), text/json/html renderers."""

from __future__ import annotations

from collections.abc import Iterator

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import placeholder_mixer
from surgery.graph_diff import diff, group_label, layer_ranges
from surgery.random_models import FAMILIES, random_model
from surgery.rewriter import rewrite



@pytest.fixture(autouse=True)
def _placeholder() -> Iterator[None]:
    """The test mixer is registered for each test only (other modules parametrise over MIXERS)."""
    with placeholder_mixer.registered():
        yield

MIX = placeholder_mixer.NAME


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_diff_every_family(family: str) -> None:
    teacher = random_model(family)
    student, plan = rewrite(teacher, [{"layers": 0, "mixer": "keep"}, {"layers": "1:", "mixer": MIX}])
    d = diff(teacher, student, plan)
    assert [b.status for b in d.blocks] == ["kept", "replaced", "replaced", "replaced"]
    assert [c.layer for c in d.nodes_replaced] == [1, 2, 3]
    assert not d.nodes_removed and not d.nodes_added and not d.edges_added and not d.edges_removed
    assert d.total_before == sum(p.numel() for p in teacher.parameters())
    assert d.total_after == sum(p.numel() for p in student.parameters()) == plan.total_after
    change = d.nodes_replaced[0]
    assert change.student_class == "PlaceholderLinear" and change.mixer == MIX
    assert set(change.added_tensors) == {"C_proj.weight", "B_proj.weight", "x_proj.weight", "out_proj.weight"}
    assert change.transfer == plan.entries[1].transfer and len(change.transfer) == 4
    payload = json.loads(json.dumps(d.to_dict()))
    assert payload["summary"]["nodes_replaced"] == 3
    text = d.to_text()
    assert "3 nodes replaced" in text and "{1..3}" in text
    page = d.to_html()
    assert page.startswith("<!doctype html>") and "<svg" in page
    assert "<script" not in page and not re.search(r"(src|href)=\"(https?:)?//", page)


def test_transfer_inferred_without_plan() -> None:
    teacher = random_model("llama")
    student, _ = rewrite(teacher, [{"layers": [2], "mixer": MIX}])
    (change,) = diff(teacher, student).nodes_replaced
    assert change.transfer_inferred
    assert change.transfer == {
        "model.layers.2.self_attn.C": "model.layers.2.self_attn.q_proj.weight",
        "model.layers.2.self_attn.B": "model.layers.2.self_attn.k_proj.weight",
        "model.layers.2.self_attn.x": "model.layers.2.self_attn.v_proj.weight",
        "model.layers.2.self_attn.out": "model.layers.2.self_attn.o_proj.weight",
    }
    # nothing transferred -> nothing inferred
    student, _ = rewrite(teacher, [{"layers": [2], "mixer": MIX, "init": {"transfer": []}}])
    assert diff(teacher, student).nodes_replaced[0].transfer == {}


def test_identity_diff_is_empty() -> None:
    teacher = random_model("gpt2")
    student, plan = rewrite(teacher, [])
    d = diff(teacher, student, plan)
    assert not d.nodes_replaced and {b.status for b in d.blocks} == {"unchanged"}
    assert d.total_before == d.total_after
    assert "unchanged" in d.to_html()


def test_diff_on_meta_models() -> None:
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(random_model("qwen3").config)
    student, plan = rewrite(skeleton, [{"mixer": MIX}])
    d = diff(skeleton, student, plan)
    assert len(d.nodes_replaced) == 4 and d.total_after == plan.total_after
    assert "<svg" in d.to_html()


def test_structural_change_reported() -> None:
    """A student whose block graph differs (an extra module call) shows nodes/edges added."""
    teacher = random_model("llama")
    student, _ = rewrite(teacher, [])
    layer = student.model.layers[1]

    class Doubled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 2

    layer.mlp = Doubled(layer.mlp)
    d = diff(teacher, student)
    assert d.blocks[1].status == "replaced" and d.blocks[1].mixer is None
    assert any(c.key == "model.layers.1.mlp" for c in d.nodes_replaced)



def test_rewired_block_reports_edge_changes() -> None:
    """A block whose wiring changes (MLP reads the attention output directly, no second norm or residual)."""
    teacher = random_model("llama")
    student, _ = rewrite(teacher, [])
    layer = student.model.layers[2]

    class Rewired(type(layer)):  # type: ignore[misc]
        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
            h = self.input_layernorm(hidden_states)
            h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  cache_position=cache_position, position_embeddings=position_embeddings, **kwargs)
            return hidden_states + self.mlp(h)

    layer.__class__ = Rewired
    d = diff(teacher, student)
    block = d.blocks[2]
    assert block.status == "changed" and not block.replaced
    assert ("model.layers.2.post_attention_layernorm", "model.layers.2.mlp") in block.edges_removed
    assert ("model.layers.2.self_attn[0]", "model.layers.2.mlp") in block.edges_added
    assert "model.layers.2.post_attention_layernorm" in d.nodes_removed
    assert [b.status for b in d.blocks] == ["unchanged", "unchanged", "changed", "unchanged"]
    assert "edges" in d.to_text() and "post_attention_layernorm" in d.to_html()


def test_labels() -> None:
    assert layer_ranges([7, 1, 2, 3, 5]) == "1..3,5,7"

    class C:
        def __init__(self, layer: int) -> None:
            self.layer, self.key = layer, f"model.layers.{layer}.self_attn"

    assert group_label([C(1), C(2), C(4)]) == "model.layers.{1..2,4}.self_attn"
    assert group_label([C(3)]) == "model.layers.3.self_attn"
