"""report.json / report.md name a stage that raised its own held-out metric, and say what to change."""

from __future__ import annotations

from verify.measure import Measurement
from verify.report import build_report, report_markdown


def m(s1: float, s2: float, kl: float) -> Measurement:
    return Measurement(stage1={"layers.0.attn": s1}, stage2={"layers.0": s2}, kl=kl, perplexity=10.0,
                       teacher_perplexity=5.0, top1_agreement=0.5, tokens=64)


def report(trail, enabled=(1, 2, 3)):
    stages = {s: {"enabled": s in enabled, "tokens": 512, "steps": 2} for s in (1, 2, 3)}
    return build_report(teacher="random:llama", trail=trail, stages=stages, name="t")


def test_a_stage_that_raised_its_metric_is_named_with_the_fields_to_change() -> None:
    # stage 2 raises the block distance 4.0 -> 4.5; stages 1 and 3 lower theirs
    r = report([("transfer", m(3.0, 5.0, 2.0)), ("after_stage1", m(2.0, 4.0, 1.9)),
                ("after_stage2", m(2.1, 4.5, 1.5)), ("after_stage3", m(2.2, 4.6, 1.0))])
    assert len(r["warnings"]) == 1
    w = r["warnings"][0]
    assert w.startswith("stage 2 (hidden-state alignment) raised its own metric") and "from 4 to 4.5 in 2 steps" in w
    assert "stages.stage2.tokens" in w and "stages.stage2.lr" in w
    text = report_markdown(r)
    assert "## Warnings" in text and f"- {w}" in text


def test_no_warning_when_every_stage_lowers_its_metric_or_did_not_run() -> None:
    r = report([("transfer", m(3.0, 5.0, 2.0)), ("after_stage1", m(2.0, 4.0, 1.9)),
                ("after_stage3", m(2.2, 4.6, 1.0))], enabled=(1, 3))  # stage 2 off: its metric rising is not its doing
    assert r["warnings"] == []
    assert "## Warnings" not in report_markdown(r)


def test_stage3_raising_the_kl_is_named() -> None:
    r = report([("transfer", m(3.0, 5.0, 2.0)), ("after_stage3", m(3.0, 5.0, 2.5))], enabled=(3,))
    assert [w.split(" raised")[0] for w in r["warnings"]] == ["stage 3 (knowledge distillation)"]
