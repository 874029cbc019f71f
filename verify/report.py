"""Reports: ``report.json`` (machine-readable) and ``report.md`` (for people), plus plots.

``report.json`` keys: ``teacher``, ``tokens`` per stage, ``stage1.per_node[path].{before,after}``,
``stage2.per_block[path].{before,after}``, ``stage3.kl.{before,after}``,
``perplexity.{teacher,student_transfer_only,student_final}``, ``top1_agreement``,
``stages`` (what ran, steps, seconds, tokens/s), ``measurements`` (every
held-out measurement in order: ``transfer``, ``after_stage1``, ...) and ``warnings`` (a
sentence per stage that ran and ended with its own metric higher than it began).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .measure import Measurement

STAGE_NAMES = {1: "matrix orientation", 2: "hidden-state alignment", 3: "knowledge distillation"}


def _before_after(trail: list[tuple[str, Measurement]], stage: int) -> tuple[Measurement, Measurement]:
    """Measurements just before and just after ``stage`` (the same one when it did not run)."""
    names = [name for name, _ in trail]
    after_name = f"after_stage{stage}"
    if after_name in names:
        i = names.index(after_name)
        return trail[i - 1][1], trail[i][1]
    earlier = [m for name, m in trail if name == "transfer" or int(name[-1]) < stage]
    m = earlier[-1]
    return m, m


def build_report(
    *,
    teacher: str,
    trail: list[tuple[str, Measurement]],
    stages: dict[int, dict[str, Any]],
    name: str | None = None,
) -> dict[str, Any]:
    """Assemble the report from the measurement trail (``[("transfer", m0), ("after_stage1", m1), ...]``)."""
    s1_before, s1_after = _before_after(trail, 1)
    s2_before, s2_after = _before_after(trail, 2)
    s3_before, s3_after = _before_after(trail, 3)
    transfer, final = trail[0][1], trail[-1][1]
    report = {
        "name": name,
        "teacher": teacher,
        "tokens": {f"stage{s}": info.get("tokens", 0) if info.get("enabled") else 0 for s, info in stages.items()},
        "stages": {f"stage{s}": info for s, info in stages.items()},
        "stage1": {
            "per_node": {p: {"before": s1_before.stage1.get(p), "after": s1_after.stage1.get(p)} for p in s1_after.stage1},
            "mean": {"before": s1_before.mean_stage1, "after": s1_after.mean_stage1},
        },
        "stage2": {
            "per_block": {p: {"before": s2_before.stage2[p], "after": s2_after.stage2[p]} for p in s2_after.stage2},
            "mean": {"before": s2_before.mean_stage2, "after": s2_after.mean_stage2},
        },
        "stage3": {"kl": {"before": s3_before.kl, "after": s3_after.kl}},
        "perplexity": {
            "teacher": final.teacher_perplexity,
            "student_transfer_only": transfer.perplexity,
            "student_final": final.perplexity,
        },
        "top1_agreement": {"student_transfer_only": transfer.top1_agreement, "student_final": final.top1_agreement},
        "heldout_tokens": final.tokens,
        "measurements": {name: m.to_dict() for name, m in trail},
    }
    report["warnings"] = stage_warnings(report)
    return report


METRIC_NAMES = {1: "mean matrix distance", 2: "mean block distance", 3: "KL to the teacher"}


def _stage_metrics(report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Each stage's own metric, ``{"before", "after"}``: mean node distance, mean block distance, KL."""
    return {1: report["stage1"]["mean"], 2: report["stage2"]["mean"], 3: report["stage3"]["kl"]}


def stage_warnings(report: dict[str, Any]) -> list[str]:
    """A sentence for each stage that ran and raised its own held-out metric, with what to try.

    A stage that makes its own objective worse on held-out text has usually taken too few steps
    for its learning-rate warm-up, or a learning rate too high.
    """
    out = []
    for s, m in _stage_metrics(report).items():
        info = report["stages"].get(f"stage{s}", {})
        before, after = m["before"], m["after"]
        if not info.get("enabled") or _arrow(before, after) != "higher":
            continue
        out.append(f"stage {s} ({STAGE_NAMES[s]}) raised its own metric, the {METRIC_NAMES[s]}, from "
                   f"{_fmt(before)} to {_fmt(after)} in {info.get('steps', 0)} steps: give it more tokens "
                   f"(stages.stage{s}.tokens) or a lower learning rate (stages.stage{s}.lr)")
    return out


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _arrow(before: Any, after: Any) -> str:
    if not isinstance(before, float) or not isinstance(after, float) or math.isnan(before) or math.isnan(after):
        return ""
    return "lower" if after < before else ("same" if after == before else "higher")


def report_markdown(report: dict[str, Any], plots: list[str] = ()) -> str:  # type: ignore[assignment]
    """A readable summary of :func:`build_report`'s output."""
    lines = [f"# surgery report{': ' + report['name'] if report.get('name') else ''}", ""]
    lines += [f"Teacher: `{report['teacher']}`; held-out tokens per measurement: {report['heldout_tokens']}.", ""]
    lines += ["## Stages", "", "| stage | ran | tokens | steps | seconds | tokens/s | metric before | after | |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    metric = _stage_metrics(report)
    for s in (1, 2, 3):
        info = report["stages"].get(f"stage{s}", {})
        m = metric[s]
        lines.append(
            f"| {s} {STAGE_NAMES[s]} | {'yes' if info.get('enabled') else 'no'} | {info.get('tokens', 0)} | "
            f"{info.get('steps', 0)} | {_fmt(info.get('seconds'))} | {_fmt(info.get('tokens_per_s'))} | "
            f"{_fmt(m['before'])} | {_fmt(m['after'])} | {_arrow(m['before'], m['after']) if info.get('enabled') else ''} |"
        )
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    ppl = report["perplexity"]
    top1 = report["top1_agreement"]
    lines += ["", "Stage metrics: 1 = mean Frobenius distance to the teacher attention matrix per node; "
              "2 = mean per-token L2 distance to the teacher block output; 3 = KL(teacher || student) per token.", ""]
    lines += ["## Held-out perplexity", "", "| model | perplexity | top-1 agreement with teacher |", "| --- | --- | --- |",
              f"| teacher | {_fmt(ppl['teacher'])} | 1 |",
              f"| student after weight transfer only | {_fmt(ppl['student_transfer_only'])} | {_fmt(top1['student_transfer_only'])} |",
              f"| student final | {_fmt(ppl['student_final'])} | {_fmt(top1['student_final'])} |", ""]
    if report.get("timings"):
        lines += ["## Wall time", "", "| phase | seconds |", "| --- | --- |"]
        lines += [f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in report["timings"].items()] + [""]
    if report.get("layer_choice"):
        lines += ["## Attention layers kept", "", report["layer_choice"]["text"], ""]
    if report["stage1"]["per_node"] or report["stage2"]["per_block"]:
        lines += ["## Per layer", "", "| node | stage 1 before | stage 1 after | stage 2 before | stage 2 after |",
                  "| --- | --- | --- | --- | --- |"]
        blocks = report["stage2"]["per_block"]
        for block, s2 in blocks.items():
            node = next((p for p in report["stage1"]["per_node"] if p.startswith(block + ".")), None)
            s1 = report["stage1"]["per_node"].get(node, {}) if node else {}
            lines.append(f"| `{node or block}` | {_fmt(s1.get('before'))} | {_fmt(s1.get('after'))} | "
                         f"{_fmt(s2['before'])} | {_fmt(s2['after'])} |")
        lines.append("")
    for plot in plots:
        lines += [f"![{Path(plot).stem}]({plot})", ""]
    return "\n".join(lines)
