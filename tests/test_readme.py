"""The README's commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- two-commands -->\s*```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README.md needs the two-commands block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands() -> None:
    main_job, tests = _readme_commands()
    assert main_job.endswith("surgery apply recipes/smollm2_mamba.yaml")
    assert "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), f"'.ci/run' must run the README's test command verbatim: {tests}"


def test_recipes_named_in_readme_exist() -> None:
    text = (ROOT / "README.md").read_text()
    for name in set(re.findall(r"recipes/[\w.-]+\.yaml", text)):
        assert (ROOT / name).is_file(), name
