"""The exported directory's ``README.md``: how to load it natively, what the check measured, then the student's card."""

from __future__ import annotations

import re
from typing import Any

from .. import __version__
from .exactness import Exactness

FRONT_MATTER = re.compile(r"^---\s*\n(.*?)\n---\s*\n", flags=re.DOTALL)
STUDENT_ONLY_SECTIONS = ("How to use",)  # the student card's sections that describe loading through surgery


def _front_value(front: str, key: str) -> str | None:
    m = re.search(rf"^{key}:\s*(.+)$", front, flags=re.MULTILINE)
    return m.group(1).strip() if m else None


def _card_body(card: str) -> str:
    """The student card without its front matter and without the sections about loading it through surgery."""
    body = FRONT_MATTER.sub("", card, count=1)
    parts = re.split(r"(?m)^(?=## )", body)
    kept = [p for p in parts if not any(p.startswith(f"## {title}") for title in STUDENT_ONLY_SECTIONS)]
    return "".join(kept).strip()


def export_card(
    *, student_card: str | None, name: str, target: str, architecture: str, config: dict[str, Any],
    identity: list[int], exactness: Exactness, min_transformers: str, notes: list[str],
) -> str:
    """The ``README.md`` of the exported directory; ``identity``: layers added that compute the identity."""
    front = FRONT_MATTER.match(student_card or "")
    license_ = _front_value(front.group(1), "license") if front else None
    base_model = _front_value(front.group(1), "base_model") if front else None
    kept = [i for i in config["attn_layer_indices"] if i not in identity]
    n = config["num_hidden_layers"] - len(identity)
    lines = ["---", "library_name: transformers", f"license: {license_ or 'other'}"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["pipeline_tag: text-generation", "tags:", "- surgery", f"- {target}", "- mamba2", "- state-space-model",
              *(["- hybrid"] if kept else []), "---", "",
              f"# {name} ({architecture})", "",
              (f"A native `{architecture}` checkpoint exported by surgery {__version__} from the surgery student "
               f"`{name}`: {n - len(kept)} of {n} layers are Mamba-2 mixers"
               + (f", {'layers' if len(kept) > 1 else 'layer'} {', '.join(map(str, kept))} "
                  f"{'are' if len(kept) > 1 else 'is'} attention." if kept else ", none is attention.")
               + (f" Layer {', '.join(map(str, identity))} is an added identity layer (attention and MLP weights all "
                  "zero: it adds exactly 0) that lets transformers' cached generate run, which fails when no layer "
                  "is attention." if identity else "")
               + f" It loads with plain transformers (>= {min_transformers}); surgery is not needed and no remote "
               "code runs."), "",
              "## How to use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
              'ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids',
              "print(tokenizer.decode(model.generate(ids, max_new_tokens=32)[0]))", "```", "",
              f"Serving engines with a `{architecture}` implementation load the directory as it is, e.g. "
              "`vllm serve path/to/this/directory`.", ""]
    if notes:
        lines += ["Caveats:", "", *[f"- {note}" for note in notes], ""]
    lines += ["## Checked at export", "",
              (f"transformers {exactness.transformers} loaded this directory and computed the student's logits on "
               f"{exactness.probe_tokens} probe tokens within {exactness.max_abs_logit_diff:.2g} (float32, largest "
               f"logit {exactness.logit_scale:.3g}); greedy cached generation gave the same "
               f"{exactness.greedy_tokens} tokens. `surgery_provenance.json` records the export and the student's "
               "provenance."), ""]
    body = _card_body(student_card) if student_card else ""
    if body:
        lines += ["## The student's model card", "", re.sub(r"(?m)^(#+) ", r"#\1 ", body), ""]
    return "\n".join(lines)
