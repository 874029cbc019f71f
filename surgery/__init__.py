"""surgery: turn a pretrained Transformer into a state-space model by declarative model surgery.

Public API (imported lazily so ``import surgery`` stays fast)::

    import surgery
    recipe = surgery.Recipe.load("recipes/tiny.yaml", overrides=["stages.stage3.lr=1e-4"])
    teacher = surgery.load_teacher("random:llama")
    student, plan = surgery.rewrite(teacher.model, [surgery.Replace(mixer="discrete_mamba2")])
    print(surgery.diff(teacher.model, student).to_text())
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Recipe": "surgery.recipe",
    "Replace": "surgery.recipe",
    "SurgeryError": "surgery.errors",
    "load_teacher": "surgery.teacher",
    "rewrite": "surgery.rewriter",
    "plan": "surgery.rewriter",
    "splice": "surgery.rewriter",
    "select": "surgery.selector",
    "preview": "surgery.selector",
    "diff": "surgery.graph_diff",
    "load": "surgery.student",
    "save": "surgery.student",
    "load_tokenizer": "surgery.student",
    "apply": "surgery.pipeline",
    "export": "surgery.native",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        value = getattr(module, "ReplaceRule" if name == "Replace" else name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = ["__version__", *_EXPORTS]
