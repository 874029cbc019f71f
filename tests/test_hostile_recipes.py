"""Hostile recipes (issue #19): each is refused with one RecipeError naming the file, field or line, quickly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from surgery.errors import RecipeError
from surgery.recipe import Recipe
from surgery.safe_yaml import MAX_DEPTH, MAX_NODES

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def tiny_text(tmp_path: Path) -> str:
    return TINY.read_text().replace("dir: runs/tiny", f"dir: {tmp_path / 'out'}")


def refused(path: Path, *overrides: str) -> str:
    with pytest.raises(RecipeError) as err:
        Recipe.load(path, list(overrides))
    return str(err.value)


# --------------------------------------------------------------------------- files and YAML


def test_non_utf8_recipe_and_base_are_named(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(tiny_text(tmp_path).replace("name: tiny", "name: caf\xe9").encode("latin-1"))
    assert refused(latin) == f"{latin}: not UTF-8 text (byte 0xe9 at offset {tiny_text(tmp_path).index('name: tiny') + 9}); save it as UTF-8"
    child = tmp_path / "child.yaml"
    child.write_text("base: latin.yaml\nseed: 3\n")
    message = refused(child)
    assert message.startswith(f"{child}: base: {latin}: not UTF-8 text")


def test_duplicate_key_names_the_key_and_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    text = tiny_text(tmp_path)
    path.write_text(text + "seed: 5\n")
    first = text.splitlines().index("seed: 0") + 1
    last = len(text.splitlines()) + 1
    assert f"key 'seed' appears twice in one mapping (lines {first} and {last})" in refused(path)


def test_duplicate_keys_in_nested_mappings_and_flow_style(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(tiny_text(tmp_path).replace("lr: 3.0e-3, checkpoint_every: 2}", "lr: 3.0e-3, lr: 1.0, checkpoint_every: 2}", 1))
    assert "key 'lr' appears twice" in refused(path)


def test_merge_keys_still_override_without_being_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    text = tiny_text(tmp_path).replace(
        "stages:\n  stage1: {tokens: 2048, tokens_per_step: 256, micro_batch: 2, lr: 3.0e-3, checkpoint_every: 2}",
        "common: &common {tokens: 2048, tokens_per_step: 256, micro_batch: 2, lr: 3.0e-3, checkpoint_every: 2}\n"
        "stages:\n  stage1: {<<: *common, lr: 1.0e-3}",
    )
    path.write_text(text)
    raw = yaml.safe_load(text)
    raw.pop("common")
    recipe = Recipe.from_dict(raw)  # the plain reading: merge keys work and the explicit lr wins
    assert recipe.stages.stage1.lr == 1e-3
    assert "common: unknown field" in refused(path)  # the same file through the guarded loader: only the extra key


def test_billion_laughs_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        prev, name = chr(96 + i), chr(97 + i)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "lol.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    message = refused(path)
    assert f"anchors and aliases expand to more than {MAX_NODES} values" in message
    assert time.perf_counter() - start < 30  # a hang guard, not a benchmark (the expansion is 9**10 values)


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("teacher: &t {model: *t}\n")
    assert "alias *t is used inside its own anchor" in refused(path)


def test_deep_nesting_is_refused_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("teacher: " + "[" * 5000 + "]" * 5000 + "\n")
    assert f"nested deeper than {MAX_DEPTH} levels" in refused(path)
    path.write_text("teacher:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 200)) + "\n")
    assert f"nested deeper than {MAX_DEPTH} levels" in refused(path)


def test_override_values_are_read_with_the_same_limits(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(tiny_text(tmp_path))
    assert "nested deeper than" in refused(path, "replace.0.params={a: " + "[" * 100 + "]" * 100 + "}")
    assert "appears twice" in refused(path, "replace.0.params={chunk_size: 8, chunk_size: 16}")


@pytest.mark.parametrize(
    "base,expected",
    [
        (".", "is a directory, not a base recipe file"),
        ("''", "base: must be the path of another recipe file, got ''"),
        ("/dev/zero", "/dev/zero is a character device, not a base recipe file"),
        ("nothing.yaml", "nothing.yaml: no such base recipe file"),
    ],
)
def test_bad_base_says_what_it_is(tmp_path: Path, base: str, expected: str) -> None:
    path = tmp_path / "child.yaml"
    path.write_text(f"base: {base}\nseed: 1\n")
    message = refused(path)
    assert message.startswith(f"{path}: base") and expected in message, message


def test_python_file_as_base_blames_the_base(tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text("def f(x):\n    return x\n")
    path = tmp_path / "child.yaml"
    path.write_text("base: helper.py\nseed: 1\n")
    message = refused(path)
    assert message.startswith(f"{path}: base: {tmp_path / 'helper.py'} is not a recipe: its top level has 'def f(x)'")


def test_errors_of_a_recipe_with_a_base_name_both_files(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(tiny_text(tmp_path).replace("lr: 3.0e-3, checkpoint_every", "lr: fast, checkpoint_every", 1))
    path = tmp_path / "child.yaml"
    path.write_text("base: base.yaml\nseed: 1\n")
    message = refused(path)
    assert message.startswith(f"{path} (with base {tmp_path / 'base.yaml'}): invalid recipe")
    assert "stages.stage1.lr: Input should be a valid number" in message


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "override,expected",
    [
        ("seed=99999999999999999999", "seed: Input should be less than 9223372036854775808"),
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        ("data.seed=99999999999999999999", "data.seed: Input should be less than 9223372036854775808"),
        ("stages.stage1.lr=.nan", "stages.stage1.lr: Input should be a finite number"),
        ("stages.stage3.temperature=.inf", "stages.stage3.temperature: Input should be a finite number"),
        ("replace.0.layers=true", "replace[0].layers: expected a number, not true/false"),
        ("replace.0.layers=[0, true]", "replace[0].layers: expected a number, not true/false"),
        ("stages.stage1.tokens=true", "stages.stage1.tokens: expected a number, not true/false"),
        ("stages.stage1.betas=[true, 0.9]", "stages.stage1.betas: expected a number, not true/false"),
        ("replace.0.params.d_state=true", "params.d_state: expected a number, not true/false"),
        ("output.dir=/", "output.dir: '/' names no new directory"),
        ("output.dir=''", "output.dir: the output directory is empty"),
    ],
)
def test_bad_values_are_refused_with_the_field(tmp_path: Path, override: str, expected: str) -> None:
    assert expected in refused(TINY, override)


def test_bools_stay_bools(tmp_path: Path) -> None:
    recipe = Recipe.load(TINY, ["stages.stage1.enabled=false", "replace.0.init.v_to_x=true", "replace.0.layers=[0, 2]"])
    assert recipe.stage(1).enabled is False and recipe.replace[0].init["v_to_x"] is True
    assert recipe.replace[0].layers == [0, 2]


def test_budget_not_a_multiple_of_a_step_is_rounded_up_and_said(caplog: pytest.LogCaptureFixture) -> None:
    recipe = Recipe.load(TINY, ["stages.stage1.tokens=2000", "stages.stage2.tokens=2048"])
    assert recipe.stage(1).tokens == 2048 and recipe.stage(2).tokens == 2048
    assert recipe.notes == ["stages.stage1.tokens (2000) is not a multiple of tokens_per_step (256): rounded up "
                            "to 2048 (8 optimizer steps)"]
    assert f"{TINY}: stages.stage1.tokens (2000) is not a multiple" in caplog.text
    assert Recipe.model_validate(recipe.model_dump()).notes == []  # the resolved recipe is whole steps


@pytest.mark.parametrize(
    "overrides,needy",
    [
        (["replace=[{mixer: keep}]"], "stage1 and stage2"),
        (["replace=[{mixer: keep, layers: '::2'}, {mixer: keep}]", "stages.stage1.enabled=false"], "stage2"),
        (["replace=[]"], "stage1 and stage2"),
    ],
)
def test_recipe_that_replaces_nothing_with_stages_1_or_2_is_refused_at_validate(overrides: list[str], needy: str) -> None:
    message = refused(TINY, *overrides)
    assert f"so no node is replaced, but {needy} train replaced nodes" in message


def test_keep_only_recipe_with_stage_3_alone_is_valid() -> None:
    recipe = Recipe.load(TINY, ["replace=[{mixer: keep}]", "stages.stage1.enabled=false", "stages.stage2.enabled=false"])
    assert [r.mixer for r in recipe.replace] == ["keep"]


# --------------------------------------------------------------------------- no torch for schema-only commands


def test_validate_and_schema_import_neither_torch_nor_transformers() -> None:
    code = (
        "import sys\n"
        "from surgery.cli import main\n"
        f"assert main(['validate', {str(TINY)!r}, 'stages.stage1.lr=1e-3']) == 0\n"
        "assert main(['schema', '--compact']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'safetensors'))\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


def test_torch_free_option_models_are_the_rules_own() -> None:
    from rewrites.registry import DECLARED, RULES, get_rule
    from rewrites.rule_options import KeepParams  # noqa: F401 - the declarations

    get_rule("keep")  # loads the full registry
    assert set(DECLARED) <= set(RULES)
    for name, declared in DECLARED.items():
        spec = RULES[name]
        assert (declared.params_model, declared.init_model, declared.replaces) == (
            spec.params_model, spec.init_model, spec.replaces), name
