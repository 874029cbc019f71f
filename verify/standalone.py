"""``surgery verify STUDENT_DIR``: measure a saved student against its teacher, on held-out text.

The teacher is the one recorded in the student's config (``surgery.teacher``);
the text comes from ``--data`` and is split with the same fixed seed as
``surgery eval``, so numbers from both commands refer to the same documents.
Writes ``STUDENT_DIR/verify/report.json``, ``report.md`` and ``per_layer.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from surgery.errors import StudentError
from surgery.io import atomic_write_json, atomic_write_text
from surgery.options import EvalOptions
from surgery.runtime import resolve_device

from .measure import Measurement, measure
from .objective import replaced_nodes
from .plots import plot_per_layer


def teacher_reference(student_dir: Path) -> str:
    """The teacher reference recorded in a student's ``config.json``."""
    config = json.loads((student_dir / "config.json").read_text(encoding="utf-8"))
    teacher = config.get("surgery", {}).get("teacher")
    ref = teacher.get("ref") if isinstance(teacher, dict) else teacher
    if not isinstance(ref, str) or not ref:
        raise StudentError(f"{student_dir}/config.json records no teacher (surgery.teacher); cannot verify against it")
    return ref


def verification_report(student_dir: str, teacher: str, data: str, m: Measurement) -> dict[str, Any]:
    """``report.json`` of ``surgery verify``: one measurement, no before/after."""
    return {
        "student": student_dir,
        "teacher": teacher,
        "data": data,
        "tokens": m.tokens,
        "stage1": {"per_node": m.stage1, "mean": m.mean_stage1},
        "stage2": {"per_block": m.stage2, "mean": m.mean_stage2},
        "stage3": {"kl": m.kl},
        "perplexity": {"teacher": m.teacher_perplexity, "student": m.perplexity},
        "top1_agreement": m.top1_agreement,
    }


def _f(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def verification_markdown(report: dict[str, Any]) -> str:
    """A readable summary of :func:`verification_report`."""
    lines = [
        f"# surgery verify: `{report['student']}`",
        "",
        f"Teacher `{report['teacher']}`, {report['tokens']} held-out tokens of `{report['data']}`.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| stage 1: mean Frobenius distance to teacher attention (per node) | {_f(report['stage1']['mean'])} |",
        f"| stage 2: mean per-token L2 distance to teacher block (per block) | {_f(report['stage2']['mean'])} |",
        f"| stage 3: KL(teacher \\|\\| student) per token | {_f(report['stage3']['kl'])} |",
        f"| teacher perplexity | {_f(report['perplexity']['teacher'])} |",
        f"| student perplexity | {_f(report['perplexity']['student'])} |",
        f"| top-1 agreement with the teacher | {_f(report['top1_agreement'])} |",
        "",
        "![per layer](per_layer.png)",
        "",
    ]
    return "\n".join(lines)


def verify_student(student_dir: str, opts: EvalOptions | None = None) -> str:
    """Measure the student in ``student_dir``; write its verification report; return the markdown."""
    from surgery.evaluate import heldout_for_eval
    from surgery.student import load_model_ref
    from surgery.teacher import load_teacher

    opts = opts or EvalOptions()
    path = Path(student_dir)
    device = resolve_device(opts.device)
    student = load_model_ref(str(path), device=device)
    if student.kind != "student":
        raise StudentError(f"{student_dir} is not a student directory (no surgery section in config.json)")
    ref = teacher_reference(path)
    teacher = load_teacher(ref, device=device, progress=False)
    batches, _ = heldout_for_eval(student.tokenizer, opts)
    nodes = replaced_nodes(student.model)
    m = measure(teacher.model, student.model, nodes, batches, device=device, desc="verify")
    report = verification_report(str(path), ref, opts.data, m)
    out = path / "verify"
    out.mkdir(exist_ok=True)
    atomic_write_json(out / "report.json", report)
    plot_per_layer({"stage1": {"student": m.stage1}, "stage2": {"student": m.stage2}}, out / "per_layer.png")
    text = verification_markdown(report)
    atomic_write_text(out / "report.md", text)
    return text
