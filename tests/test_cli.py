"""The ``surgery`` command as a user runs it: exit codes, messages, nothing written on error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def surgery(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m surgery ARGS`` in a fresh process."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=300)


def test_every_shipped_recipe_validates() -> None:
    assert RECIPES, "recipes/ is empty"
    result = surgery("validate", *map(str, RECIPES))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok  ") == len(RECIPES)


def test_schema_prints_json_schema() -> None:
    result = surgery("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "surgery recipe" and "teacher" in schema["properties"]


def test_help_teaches_with_examples() -> None:
    for command in ("validate", "plan", "diff", "apply", "verify", "generate", "eval", "approximate"):
        result = surgery(command, "--help")
        assert result.returncode == 0
        assert "examples:" in result.stdout and f"surgery {command}" in result.stdout


def _bad_recipe(tmp_path: Path, edit: dict) -> Path:
    base = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    base.update(edit)
    base["output"] = {"dir": str(tmp_path / "out")}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize(
    "command,edit,overrides,expected",
    [
        ("validate", {"teachr": {"model": "random:llama"}}, [], "teachr: unknown field"),
        ("apply", {"stages": {"stage1": {"lr": "fast"}}}, [], "stages.stage1.lr: Input should be a valid number"),
        ("apply", {}, ["stages.stage2.tokenz=5"], "did you mean 'tokens'"),
        ("plan", {}, ["replace.0.layers=0:x"], "is not a layer slice"),
        ("apply", {}, ["replace.0.modules=model.nothing.*"], "matches no attention module"),
        ("apply", {}, ["teacher.model=random:llamma"], "llamma"),
        ("apply", {}, ["teacher.model=/no/such/dir"], "/no/such/dir"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(
    tmp_path: Path, command: str, edit: dict, overrides: list[str], expected: str
) -> None:
    path = _bad_recipe(tmp_path, edit)
    result = surgery(command, str(path), *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_unknown_command_and_missing_recipe() -> None:
    assert surgery("frobnicate").returncode == 2
    result = surgery("validate", "no-such.yaml")
    assert result.returncode == 2 and "no such recipe file" in result.stderr
