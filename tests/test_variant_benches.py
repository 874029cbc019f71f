"""bench/stages.py and bench/families.py: budgets split exactly, variants are valid recipes; bench/compare_students.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from surgery.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_split_budget_is_proportional_whole_steps_and_exact() -> None:
    stages = bench("stages")
    recipe = {1: 2_031_616, 2: 4_063_232, 3: 13_107_200}  # the GPU recipe's budgets
    step = 65_536
    for total in (2_424_832, 19_202_048, 3 * step):
        for cols in stages.COLUMNS.values():
            split = stages.split_budget(total, recipe, cols, step)
            assert set(split) == set(cols) and sum(split.values()) == total
            assert all(v % step == 0 and v >= step for v in split.values())
    full = stages.split_budget(19_202_048, recipe, (1, 2, 3), step)
    assert full == recipe  # the recipe's own total reproduces its own split
    assert stages.split_budget(2_424_832, recipe, (3,), step) == {3: 2_424_832}
    with pytest.raises(ValueError, match="multiple of tokens_per_step"):
        stages.split_budget(100_000, recipe, (1, 2, 3), step)
    with pytest.raises(ValueError, match="one step per stage"):
        stages.split_budget(step, recipe, (2, 3), step)


def test_stage_and_family_variants_are_valid_recipes() -> None:
    stages, families = bench("stages"), bench("families")
    gpu = ROOT / "recipes" / "smollm2_mamba_gpu.yaml"
    for v in stages.variants(gpu, 2_424_832, list(stages.COLUMNS), 8192):
        recipe = Recipe.load(gpu, list(v.overrides))
        enabled = [i for i in (1, 2, 3) if recipe.stage(i).enabled]
        assert tuple(enabled) == stages.COLUMNS[v.name]
        assert sum(recipe.stage(i).tokens for i in enabled) == 2_424_832
    for v in families.variants(list(families.FAMILIES), 32, 1024, 524_288, 1_572_864, False, 8192):
        recipe = Recipe.load(gpu, list(v.overrides))
        assert not recipe.stage(1).enabled and recipe.stage(3).tokens == 1_572_864
        assert recipe.replace[0].mixer == families.FAMILIES[v.name][0]


def test_compare_students_finds_the_largest_difference(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    compare = bench("compare_students")
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    w = {"x": torch.randn(4, 4), "y": torch.randn(3)}
    save_file(w, str(a / "model.safetensors"))
    save_file({"x": w["x"].clone(), "y": w["y"] + torch.tensor([0.0, 0.5, 0.0])}, str(b / "model.safetensors"))
    d = compare.weight_differences(a, b)
    assert not d["identical"] and d["max_rel_tensor"] == "y" and d["max_abs"] == pytest.approx(0.5)
    assert compare.weight_differences(a, a)["identical"]
    save_file({"x": w["x"]}, str(b / "model.safetensors"))
    with pytest.raises(SystemExit, match="different tensors"):
        compare.weight_differences(a, b)


def test_grad_probe_records_every_stage_and_names_a_differing_gradient(tmp_path: Path) -> None:
    import json

    probe = bench("grad_probe")
    path = tmp_path / "plain.json"
    rc = probe.main(["record", str(path), str(ROOT / "recipes" / "tiny.yaml"), "stages.stage1.tokens=256",
                     "stages.stage2.tokens=256", "stages.stage3.tokens=256", "stages.stage3.micro_batch=4",
                     "verify.tokens=128", "--out", str(tmp_path / "student")])
    assert rc == 0
    record = json.loads(path.read_text())
    assert sorted(record) == ["1", "2", "3"]
    assert record["3"]["accumulation"] == 1 and record["1"]["accumulation"] == 2 and record["3"]["world_size"] == 1
    norms = record["3"]["after_sync"]
    assert len(norms) > 10 and all(v is None or v >= 0 for v in norms.values())
    assert any(v and v > 0 for v in norms.values())
    assert record["3"]["before_sync"] == norms  # CPU: nothing in flight
    assert probe.main(["compare", str(path), str(path)]) == 0
    name = next(n for n, v in norms.items() if v)
    record["3"]["after_sync"][name] *= 1.001
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(record))
    lines = probe.differences(json.loads(path.read_text()), record)
    assert any(name in line and line.startswith("stage 3") for line in lines)
    assert any("changed across a device sync" in line and " b:" in line for line in lines)
    assert probe.differences(json.loads(path.read_text()), record, rel=0.01) == [
        line for line in lines if "device sync" in line]
    assert probe.main(["compare", str(path), str(changed)]) == 1
    import verify.runner as runner
    assert runner.StageRunner.__init__.__name__ == "__init__"  # the probe is removed after the run
