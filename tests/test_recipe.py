"""Recipe schema: loading, base inheritance, overrides, dumping, error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from surgery.errors import RecipeError
from surgery.recipe import Recipe, apply_overrides

GOOD = {
    "teacher": {"model": "random:llama"},
    "data": {"sources": ["builtin:python-docs"], "seq_len": 32},
    "replace": [{"layers": "::2", "mixer": "keep"}, {"mixer": "discrete_mamba2"}],
    "stages": {
        "stage1": {"tokens": 256, "tokens_per_step": 128, "micro_batch": 2},
        "stage2": {"tokens": 256, "tokens_per_step": 128, "micro_batch": 2},
        "stage3": {"tokens": 256, "tokens_per_step": 128, "micro_batch": 2},
    },
    "output": {"dir": "runs/test"},
}


def write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_good_recipe_loads_and_round_trips(tmp_path: Path) -> None:
    recipe = Recipe.load(write(tmp_path, GOOD))
    assert recipe.teacher.model == "random:llama"
    assert recipe.data.sources[0].source == "builtin:python-docs"
    assert recipe.replace[0].layers == "::2"
    dumped = yaml.safe_load(recipe.to_yaml())
    again = Recipe.model_validate(dumped)
    assert again == recipe


def test_base_inheritance_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "base.yaml")
    child = {"base": "base.yaml", "stages": {"stage3": {"lr": 5e-5}}, "replace": [{"mixer": "mamba2"}]}
    recipe = Recipe.load(write(tmp_path, child, "child.yaml"))
    assert recipe.stages.stage3.lr == 5e-5
    assert recipe.stages.stage3.tokens == 256  # inherited from the base
    assert [r.mixer for r in recipe.replace] == ["mamba2"]  # lists replace


def test_overrides_are_typed_by_yaml(tmp_path: Path) -> None:
    recipe = Recipe.load(
        write(tmp_path, GOOD),
        ["stages.stage1.enabled=false", "stages.stage3.lr=3e-4", "replace.0.layers=[0, 2]", "seed=7"],
    )
    assert recipe.stages.stage1.enabled is False
    assert recipe.stages.stage3.lr == pytest.approx(3e-4)
    assert recipe.replace[0].layers == [0, 2]
    assert recipe.seed == 7


def test_override_into_free_form_params(tmp_path: Path) -> None:
    raw = apply_overrides(GOOD, ["replace.1.params.chunk_size=16"])
    assert raw["replace"][1]["params"] == {"chunk_size": 16}
    assert "params" not in GOOD["replace"][1]  # the input is not mutated


def test_schema_is_json_schema_with_descriptions() -> None:
    schema = Recipe.json_schema()
    json.dumps(schema)
    assert schema["type"] == "object"
    assert {"teacher", "data", "replace", "stages", "output"} <= set(schema["properties"])
    stage = schema["$defs"]["Stage3Config"]["properties"]
    assert all("description" in field for field in stage.values())
    assert schema["$defs"]["TeacherConfig"]["additionalProperties"] is False


def _with(path: str, value: object) -> dict:
    data = json.loads(json.dumps(GOOD))
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


_DELETE = object()

BAD_RECIPES: list[tuple[str, dict, str]] = [
    ("unknown top-level key", _with("teachr", {"model": "x"}), "teachr: unknown field"),
    ("unknown nested key", _with("stages.stage1.tokenz", 5), "stages.stage1.tokenz: unknown field (did you mean 'tokens'?)"),
    ("missing teacher", _with("teacher", _DELETE), "teacher: required field is missing"),
    ("missing output dir", _with("output", {}), "output.dir: required field is missing"),
    ("wrong type", _with("stages.stage3.lr", "fast"), "stages.stage3.lr: Input should be a valid number"),
    ("negative budget", _with("stages.stage2.tokens", -5), "stages.stage2.tokens: Input should be greater than 0"),
    ("empty sources", _with("data.sources", []), "data.sources"),
    ("bad dtype", _with("teacher.dtype", "int8"), "teacher.dtype: Input should be"),
    ("bad device", _with("device", "gpu"), "device: String should match pattern"),
    ("bad precision", _with("precision", "fp8"), "precision: Input should be"),
    ("heldout out of range", _with("data.heldout_fraction", 0.9), "data.heldout_fraction"),
    ("step not a multiple", _with("stages.stage1.tokens_per_step", 100), "tokens_per_step (100) must be a multiple"),
    ("budget below one step", _with("stages.stage3.tokens", 64), "less than one optimizer step"),
    ("bad layer slice", _with("replace.0.layers", "0:x"), "is not a layer slice"),
    ("zero slice step", _with("replace.0.layers", "0:8:0"), "step 0"),
    ("unknown mixer", _with("replace.1.mixer", "mamba3"), "unknown mixer 'mamba3'"),
    ("unknown mixer param", _with("replace.1.params", {"d_stat": 16}), "params.d_stat: unknown option"),
    ("schedule too long", _with("stages.stage1.schedule", {"warmup": 0.7, "decay": 0.5}), "warmup + decay"),
    ("no loss in stage 3", _with("stages.stage3", {"kl_weight": 0, "tokens": 256, "tokens_per_step": 128, "micro_batch": 2}), "nothing to train on"),
    ("bad stage3 train", _with("stages.stage3.train", "some"), "stages.stage3.train"),
]


@pytest.mark.parametrize("name,data,expected", BAD_RECIPES, ids=[b[0] for b in BAD_RECIPES])
def test_bad_recipe_names_the_field(tmp_path: Path, name: str, data: dict, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.load(write(tmp_path, data))
    assert expected in str(info.value), str(info.value)
    assert "Traceback" not in str(info.value)


BAD_OVERRIDES = [
    ("stages.stage9.lr=1", "the recipe has no field" if False else "stages has no field 'stage9'"),
    ("stages.stage1.lrr=1", "did you mean 'lr'"),
    ("nonsense", "has no '='"),
    ("seed.x=1", "seed is a value, not a section"),
    ("replace.x.mixer=keep", "is a list; index it with a number"),
    ("replace.5.mixer=keep", "out of range"),
    ("stages..lr=1", "malformed"),
]


@pytest.mark.parametrize("override,expected", BAD_OVERRIDES, ids=[b[0] for b in BAD_OVERRIDES])
def test_bad_override_is_rejected(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.load(write(tmp_path, GOOD), [override])
    assert expected in str(info.value), str(info.value)


def test_override_type_error_names_field(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"stages\.stage1\.micro_batch: Input should be a valid integer"):
        Recipe.load(write(tmp_path, GOOD), ["stages.stage1.micro_batch=many"])


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("teacher:\n  model: [unclosed\n")
    with pytest.raises(RecipeError, match=r"not valid YAML \(line \d+"):
        Recipe.load(path)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        Recipe.load(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        Recipe.load(path)


def test_base_of_base_is_rejected(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, {"base": "a.yaml"}, "b.yaml")
    with pytest.raises(RecipeError, match="only one level of inheritance"):
        Recipe.load(write(tmp_path, {"base": "b.yaml"}, "c.yaml"))
