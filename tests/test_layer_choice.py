"""``layers: auto``: the hybrid keeps the attention layers that turn the residual stream most."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from surgery import load as surgery_load
from surgery.errors import RecipeError, SelectionError
from surgery.layer_choice import attention_importance, resolve_auto_layers
from surgery.options import ApplyOptions
from surgery.pipeline import apply
from surgery.random_models import random_model
from surgery.recipe import Recipe, ReplaceRule
from surgery.rewriter import rewrite

ROOT = Path(__file__).resolve().parents[1]
AUTO = "replace=[{mixer: keep, layers: auto, count: 1}, {mixer: discrete_mamba2, params: {d_state: 16, chunk_size: 16}}]"


def batches(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 200, (2, 32), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi"])
def test_importance_follows_the_attention_output(family: str) -> None:
    model = random_model(family)
    scores, tokens = attention_importance(model, batches())
    assert tokens == 2 * 2 * 32 and len(scores) >= 2
    assert all(0 <= s <= 2 for s in scores.values())
    # silence layer 0's attention and amplify the last one's: their ranks must follow
    from rewrites.adapters import get_adapter

    nodes = {v.layer: v.module for v in get_adapter(model).attention_views()}
    last = max(nodes)
    out0 = [m for n, m in nodes[0].named_modules() if n.endswith(("o_proj", "c_proj", "dense", "out_proj"))][-1]
    outl = [m for n, m in nodes[last].named_modules() if n.endswith(("o_proj", "c_proj", "dense", "out_proj"))][-1]
    with torch.no_grad():
        out0.weight.zero_()
        if getattr(out0, "bias", None) is not None:
            out0.bias.zero_()
        outl.weight.mul_(50)
    after, _ = attention_importance(model, batches())
    assert after[0] < 1e-6, after
    assert max(after, key=after.get) == last, after
    rules, choice = resolve_auto_layers([ReplaceRule(mixer="keep", layers="auto", count=1),
                                         ReplaceRule(mixer="discrete_mamba2")], model, batches())
    assert rules[0].layers == [last] and choice is not None and choice.kept == [last]
    assert f"layers [{last}]" in choice.to_text()


@pytest.mark.parametrize(("rule", "message"), [
    ({"mixer": "discrete_mamba2", "layers": "auto", "count": 2}, "needs mixer: keep"),
    ({"mixer": "keep", "layers": "auto"}, "needs count"),
    ({"mixer": "keep", "layers": [1], "count": 2}, "count is for layers: auto"),
])
def test_auto_rules_are_checked_at_validation(rule: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.load(ROOT / "recipes/tiny.yaml", [f"replace=[{json.dumps(rule)}, {{mixer: discrete_mamba2}}]"])


def test_two_auto_rules_are_refused() -> None:
    rule = "{mixer: keep, layers: auto, count: 1}"
    with pytest.raises(RecipeError, match="one rule chooses"):
        Recipe.load(ROOT / "recipes/tiny.yaml", [f"replace=[{rule}, {rule}, {{mixer: discrete_mamba2}}]"])


def test_unresolved_auto_is_named_by_the_selector() -> None:
    with pytest.raises(SelectionError, match="resolve_auto_layers"):
        rewrite(random_model("llama"), [ReplaceRule(mixer="keep", layers="auto", count=1),
                                        ReplaceRule(mixer="discrete_mamba2")])


def test_count_above_the_layers_is_an_error() -> None:
    with pytest.raises(SelectionError, match="count 9 is more than"):
        resolve_auto_layers([ReplaceRule(mixer="keep", layers="auto", count=9)], random_model("llama"), batches(1))


def test_apply_records_the_choice_and_plan_agrees(tmp_path: Path) -> None:
    recipe = Recipe.load(ROOT / "recipes/tiny.yaml", [AUTO, "stages.stage3.tokens=512"])
    out = apply(recipe, ApplyOptions(out=str(tmp_path / "student")))
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    kept = resolved["replace"][0]["layers"]
    assert isinstance(kept, list) and len(kept) == 1 and resolved["replace"][0]["count"] is None
    assert "## Attention layers kept" in (out / "report.md").read_text()
    student = surgery_load(out)
    kinds = {i: type(layer.self_attn).__name__ for i, layer in enumerate(student.model.layers)}
    assert kinds[kept[0]] == "LlamaAttention" and sum(k == "LlamaAttention" for k in kinds.values()) == 1, kinds
    shown = subprocess.run([sys.executable, "-m", "surgery", "plan", str(ROOT / "recipes/tiny.yaml"), AUTO,
                            "--format", "json"], capture_output=True, text=True, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["layer_choice"]["kept"] == kept
