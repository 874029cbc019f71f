"""No pickle: every ``torch.load`` in the project passes ``weights_only=True``; no pickle.load anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["surgery", "rewrites", "verify", "bench", "tests", "recipes", "docs"]
# Known exceptions, each (file, call) -> how many: unpickling only bytes the same test has just written.
# tests/test_cache_surgery.py checks that a student with the recurrent-cache class survives torch.save/torch.load
# (an in-memory buffer, weights_only=False by necessity: it loads a whole module). Remove the entry when that
# test changes; any new occurrence fails.
ALLOWED: dict[tuple[str, str], int] = {}


def _python_files() -> list[Path]:
    files = []
    for top in SOURCES:
        files += sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else []
    return files + sorted(ROOT.glob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, call) of ``torch.load`` without ``weights_only=True`` and of any pickle load."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("torch.load", "torch.serialization.load") or name.endswith(".torch.load"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append((node.lineno, name))
        if name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load", "pickle.Unpickler"):
            found.append((node.lineno, name))
    return found


def test_checker_catches_unsafe_calls() -> None:
    bad = "import torch, pickle\ntorch.load('x')\ntorch.load('x', weights_only=False)\npickle.load(f)\n"
    assert [line for line, _ in unsafe_loads(bad)] == [2, 3, 4]
    assert unsafe_loads("import torch\ntorch.load('x', map_location='cpu', weights_only=True)\n") == []


def test_no_torch_load_without_weights_only() -> None:
    files = _python_files()
    assert len(files) > 20
    problems = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        found = unsafe_loads(path.read_text(encoding="utf-8"))
        allowed = {call: n for (f, call), n in ALLOWED.items() if f == rel}
        for call in {c for _, c in found}:
            if sum(c == call for _, c in found) <= allowed.get(call, 0):
                found = [x for x in found if x[1] != call]
        problems += [f"{rel}:{line}: {call}" for line, call in found]
    assert not problems, "unsafe deserialisation (use safetensors, or torch.load(..., weights_only=True)):\n" + "\n".join(problems)


def test_no_torch_load_imported_under_another_name() -> None:
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
                assert "load" not in {a.name for a in node.names}, f"{path}: from torch import load"
