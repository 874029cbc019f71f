"""Surgery on the real embedded teacher (SmolLM2-135M): plan, diff, splice checks, identity, a short apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery.cli import main
from surgery.graph_diff import diff
from surgery.recipe import Recipe, ReplaceRule
from surgery.rewriter import check_splices, rewrite
from surgery.teacher import Teacher, load_teacher

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_mamba.yaml"


@pytest.fixture(scope="module")
def smollm2() -> Teacher:
    return load_teacher("builtin:smollm2-135m", progress=False)


def test_plan_and_diff_commands(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["-q", "plan", str(RECIPE), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["summary"]["replaced"] == 30 and plan["family"] == "llama"
    assert main(["-q", "diff", str(RECIPE), "--format", "html", "-o", str(tmp_path / "diff.html")]) == 0
    page = (tmp_path / "diff.html").read_text()
    assert "<svg" in page and "model.layers.29.self_attn" in page and "http" not in page.split("</head>")[0]


def test_rewrite_keeps_teacher_and_every_splice_checks_out(smollm2: Teacher) -> None:
    before = {k: v.clone() for k, v in smollm2.model.state_dict().items()}
    recipe = Recipe.load(RECIPE)
    student, plan = rewrite(smollm2.model, recipe.replace)
    checks = check_splices(smollm2.model, student, plan)
    assert len(checks) == 30 and all(c.ok for c in checks)
    ids = smollm2.tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = student(ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == 49152
    after = smollm2.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher is untouched
    teacher_ptrs = {p.data_ptr() for p in smollm2.model.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in student.parameters()}  # no shared storage
    text = diff(smollm2.model, student, plan).to_text()
    assert "30 nodes replaced" in text


def test_identity_reproduces_teacher_logits(smollm2: Teacher) -> None:
    student, plan = rewrite(smollm2.model, [])
    ids = torch.randint(0, 49152, (2, 32))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, smollm2.model(ids).logits)


def test_hybrid_rules_on_smollm2(smollm2: Teacher) -> None:
    rules = [ReplaceRule(layers="::4", mixer="keep"), ReplaceRule(mixer="discrete_mamba2")]
    _, plan = rewrite(smollm2.model, rules)
    kept = [e.layer for e in plan.entries if not e.replaced]
    assert kept == list(range(0, 30, 4))


def test_short_apply_on_the_real_teacher(tmp_path: Path) -> None:
    from surgery.pipeline import apply

    # Two stage-2 steps leave no room for warm-up: the recipe's lr 3e-3 (tuned with 8 warm-up steps of 72)
    # would open with an Adam step at 1.5e-3 that raises the distance (84 -> 94); 1e-3 opens at 5e-4.
    overrides = [f"output.dir={tmp_path / 'student'}", "replace.0.layers=[0, 15, 29]", "verify.tokens=512",
                 *[f"stages.stage{s}.tokens=1024" for s in (1, 2, 3)], "stages.stage2.lr=1e-3"]
    out = apply(Recipe.load(RECIPE, overrides))
    report = json.loads((out / "report.json").read_text())
    assert report["stage1"]["mean"]["after"] < report["stage1"]["mean"]["before"]
    assert report["stage2"]["mean"]["after"] < report["stage2"]["mean"]["before"]
    assert report["stage3"]["kl"]["after"] < report["stage3"]["kl"]["before"]
    assert report["perplexity"]["student_final"] < report["perplexity"]["student_transfer_only"]
