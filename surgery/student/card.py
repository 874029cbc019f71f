"""The generated model card, ``README.md``: what was replaced, the stages, the metrics, how to load it, the license."""

from __future__ import annotations

import math
from typing import Any

from .. import __version__


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def _seconds(x: Any) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "n/a"


def model_card(
    *, name: str, nodes: list[dict[str, Any]], plan: Any, recipe: Any, teacher_ref: str | None, report: dict | None,
    license_: str | None, family: str, architecture: str, base_model: str | None = None,
) -> str:
    """The generated ``README.md``."""
    replaced = [n for n in nodes if n.get("mixer")]
    kept = [n for n in nodes if not n.get("mixer")]
    entries = {e.path: e for e in plan.entries} if plan is not None else {}
    n_attention = len(plan.entries) if plan is not None else None
    lines = ["---", "library_name: surgery", f"license: {license_ or 'other'}"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["tags:", "- surgery", "- state-space-model", "- mamba2", "- mohawk", "- distillation", "---", ""]
    lines += [f"# {name}", ""]
    lines.append(
        f"A state-space student of **{teacher_ref or 'an unrecorded teacher'}** ({architecture}, family `{family}`), "
        f"made with surgery {__version__}: {len(replaced)} "
        f"of {n_attention if n_attention is not None else len(replaced)} attention nodes replaced"
        + (f", {len(kept)} kept as attention" if kept else "") + "."
    )
    if recipe is not None and getattr(recipe, "description", None):
        lines += ["", recipe.description.strip()]
    lines += ["", "## What was replaced", "", "| layer | node | teacher | becomes | params | parameters |",
              "| --- | --- | --- | --- | --- | --- |"]
    for n in sorted(nodes, key=lambda n: (n.get("layer", 0), n["path"])):
        e = entries.get(n["path"])
        teacher_cls = e.teacher_class if e is not None else "attention"
        becomes = n["mixer"] or f"(kept: rule `{n['rule']}`)"
        params = ", ".join(f"{k}={v}" for k, v in (n.get("params") or {}).items()) or "-"
        counts = f"{e.params_before:,} -> {e.params_after:,}" if e is not None else "-"
        lines.append(f"| {n.get('layer', '')} | `{n['path']}` | {teacher_cls} | {becomes} | {params} | {counts} |")
    if plan is not None:
        s = plan.summary()
        lines += ["", f"Parameters: {s['params_before']:,} (teacher) -> {s['params_after']:,} (student)."]
    if recipe is not None:
        lines += ["", "## Distillation stages (MOHAWK)", "", "| stage | enabled | tokens | seq len | lr | steps | seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        stage_names = {1: "1 matrix orientation", 2: "2 hidden-state alignment", 3: "3 knowledge distillation"}
        stages = (report or {}).get("stages", {})
        for s in (1, 2, 3):
            cfg = recipe.stage(s)
            info = stages.get(f"stage{s}", {})
            lines.append(f"| {stage_names[s]} | {'yes' if cfg.enabled else 'no'} | {cfg.tokens if cfg.enabled else 0:,} | "
                         f"{recipe.seq_len(s)} | {cfg.lr:g} | {_fmt(info.get('steps'))} | {_seconds(info.get('seconds'))} |")
        sources = ", ".join(f"`{src.source}`" for src in recipe.data.sources)
        lines += ["", f"Data: {sources} (seed {recipe.data_seed}, held-out fraction {recipe.data.heldout_fraction})."]
    if report:
        ppl, top1 = report.get("perplexity", {}), report.get("top1_agreement", {})
        lines += ["", "## Held-out metrics", "", "| model | perplexity | top-1 agreement with the teacher |",
                  "| --- | --- | --- |",
                  f"| teacher | {_fmt(ppl.get('teacher'))} | 1 |",
                  (f"| student, weight transfer only | {_fmt(ppl.get('student_transfer_only'))} | "
                   f"{_fmt(top1.get('student_transfer_only'))} |"),
                  f"| student, final | {_fmt(ppl.get('student_final'))} | {_fmt(top1.get('student_final'))} |",
                  "", f"On {report.get('heldout_tokens', 'n/a')} held-out tokens; details in `report.md` / `report.json`."]
    lines += ["", "## How to use", "", "```python", "import surgery", "from surgery.student import load_tokenizer", "",
              'model = surgery.load("path/to/this/directory")          # device="cuda", dtype=torch.bfloat16 also work',
              'tokenizer = load_tokenizer("path/to/this/directory")',
              'ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids',
              "out = model.generate(ids, max_new_tokens=32)        # recurrent SurgeryCache: constant memory per token",
              "print(tokenizer.decode(out[0]))", "```", "",
              "```bash", 'surgery generate path/to/this/directory "def fibonacci(n):" --max-new-tokens 64',
              "surgery eval path/to/this/directory --data builtin:python-docs", "```", "",
              ("Tools that speak the Hugging Face API load it with "
               "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (the directory's "
               "`modeling_surgery.py` hands over to `surgery.load`; `surgery` must be installed), e.g. "
               "`lm_eval --model hf --model_args pretrained=path,trust_remote_code=True`. Without "
               "`trust_remote_code=True`, transformers would build the teacher's attention layers, not the mixers."), ""]
    lines += ["## License and provenance", ""]
    if license_:
        lines.append(f"The weights derive from the teacher `{teacher_ref}`, whose license is **{license_}**; "
                     "that license applies to this student.")
    elif teacher_ref and teacher_ref.startswith("random:"):
        lines.append("The teacher was a randomly initialised model: no license is inherited from it.")
    else:
        lines.append(f"The weights derive from the teacher `{teacher_ref}`; its license was not recorded here. "
                     "Check the teacher's license before you distribute this student.")
    lines += ["", ("`provenance.json` records the package versions, seed, git revision, teacher, token counts and "
                   "the command that made this directory; `recipe.resolved.yaml` the full recipe."), ""]
    return "\n".join(lines)
