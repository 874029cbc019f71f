"""The files of a student directory: their names, and how to recognise such a directory.

::

    config.json                     teacher family config + "surgery": {version, nodes, rules, teacher, ...}
    model.safetensors               every tensor once (tied weights stored once); or, above
    model-0000i-of-0000n.safetensors  recipe.output.shard_size, shards listed in
    model.safetensors.index.json      {"metadata": {"total_size"}, "weight_map": {tensor: file}}
    generation_config.json          the teacher's generation defaults
    tokenizer.json, tokenizer_config.json, ...   the teacher's tokenizer (``tokenizer.save_pretrained``)
    recipe.resolved.yaml            the recipe with every default filled in (when saved from a recipe)
    provenance.json                 versions, seed, git revision, teacher provenance, tokens, command, date, sha256s
    report.json, report.md          the distillation report (when there is one)
    README.md                       a generated model card
    modeling_surgery.py             the Auto-class shim: AutoModelForCausalLM(..., trust_remote_code=True) loads
                                    the student through surgery.load (config.json's auto_map points at it)
    per_layer.png, losses.png, metrics.jsonl   written beside these by ``surgery apply``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1  # of the config.json "surgery" section (== surgery.rewriter.NODES_VERSION)
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
RECIPE = "recipe.resolved.yaml"
PROVENANCE = "provenance.json"
REPORT = "report.json"
REPORT_MD = "report.md"
CARD = "README.md"
DEFAULT_SHARD_SIZE = "2GB"
MARKERS = (PROVENANCE, RECIPE)  # files only a student directory has
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (non-JSON values as ``str``), the way every JSON file here is written."""
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def is_student_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like a student directory (config.json with a surgery section, or student files)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if any((path / m).is_file() for m in MARKERS):
        return True
    try:
        return "surgery" in json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
