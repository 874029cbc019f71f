"""``surgery apply`` end to end on tiny random teachers: stages, report, ablations, NaN stop, kill + resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.errors import TrainingError
from surgery.options import ApplyOptions
from surgery.pipeline import Run, apply
from surgery.recipe import Recipe
from verify.checkpoint import load_student, read_state
from verify.standalone import verify_student

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def tiny(tmp_path: Path, *overrides: str, name: str = "out") -> Recipe:
    return Recipe.load(TINY, [f"output.dir={tmp_path / name}", *overrides])


def assert_each_stage_lowers_its_metric(report: dict) -> None:
    assert report["stage1"]["mean"]["after"] < report["stage1"]["mean"]["before"]
    assert report["stage2"]["mean"]["after"] < report["stage2"]["mean"]["before"]
    assert report["stage3"]["kl"]["after"] < report["stage3"]["kl"]["before"]
    # (perplexity of a random teacher is near-uniform; the perplexity criterion is checked on SmolLM2)


@pytest.mark.parametrize("family", ["llama", "phi", "gpt2"])
def test_apply_runs_every_stage_and_reports(tmp_path: Path, family: str) -> None:
    out = apply(tiny(tmp_path, f"teacher.model=random:{family}"))
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"] == f"random:{family}"
    assert report["tokens"] == {"stage1": 2048, "stage2": 2048, "stage3": 2048}
    nodes = report["stage1"]["per_node"]
    assert len(nodes) == 4 and all(set(v) == {"before", "after"} for v in nodes.values())
    assert len(report["stage2"]["per_block"]) == 4
    assert set(report["perplexity"]) == {"teacher", "student_transfer_only", "student_final"}
    assert_each_stage_lowers_its_metric(report)
    for name in ("report.md", "per_layer.png", "losses.png", "metrics.jsonl", "model.safetensors", "config.json"):
        assert (out / name).is_file(), name
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert stages == {1, 2, 3}
    assert not out.with_name(out.name + ".partial").exists()  # checkpoints removed after success
    times = report["timings"]  # wall seconds per phase: every phase the run went through, adding up to the total
    assert {"teacher", "rewrite", "data", "evaluations", "stage1", "stage2", "stage3", "checkpoints"} <= set(times)
    assert all(v >= 0 for v in times.values()) and times["stage1"] > 0 and times["evaluations"] > 0
    assert sum(v for k, v in times.items() if k != "total") == pytest.approx(times["total"], abs=0.01)
    assert "## Wall time" in (out / "report.md").read_text()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma", "gemma3_text", "gpt_neox", "opt"])
def test_tiny_recipe_works_for_every_other_family(tmp_path: Path, family: str) -> None:
    one_step = [f"stages.stage{s}.tokens=256" for s in (1, 2, 3)]
    out = apply(tiny(tmp_path, f"teacher.model=random:{family}", "verify.tokens=128", *one_step))
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"] == f"random:{family}" and len(report["stage2"]["per_block"]) == 4
    assert all(math.isfinite(v["after"]) for v in report["stage1"]["per_node"].values())
    assert report["stage1"]["mean"]["after"] < report["stage1"]["mean"]["before"]


@pytest.mark.parametrize("enabled", [(2,), (3,), (2, 3)], ids=["stage2-only", "stage3-only", "stages2-3"])
def test_stage_ablations(tmp_path: Path, enabled: tuple[int, ...]) -> None:
    flags = [f"stages.stage{s}.enabled={'true' if s in enabled else 'false'}" for s in (1, 2, 3)]
    out = apply(tiny(tmp_path, *flags))
    report = json.loads((out / "report.json").read_text())
    assert [s for s in (1, 2, 3) if report["stages"][f"stage{s}"]["enabled"]] == list(enabled)
    assert list(report["measurements"]) == ["transfer"] + [f"after_stage{s}" for s in enabled]
    if 3 in enabled:
        assert report["stage3"]["kl"]["after"] < report["stage3"]["kl"]["before"]
    if 2 in enabled:
        assert report["stage2"]["mean"]["after"] < report["stage2"]["mean"]["before"]


def test_nan_stops_with_clear_message_and_checkpoint_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from verify.stage2_hidden import HiddenStateAlignment

    original = HiddenStateAlignment.train_step
    calls = {"n": 0}

    def poisoned(self: HiddenStateAlignment, input_ids: torch.Tensor, scale: float) -> dict[str, float]:
        calls["n"] += 1
        metrics = original(self, input_ids, scale)
        return {**metrics, "loss": math.nan} if calls["n"] == 9 else metrics  # 2 micro-batches a step: step 5

    monkeypatch.setattr(HiddenStateAlignment, "train_step", poisoned)
    recipe = tiny(tmp_path, "stages.stage2.checkpoint_every=1")
    run = Run(recipe, ApplyOptions())
    run.setup()
    with pytest.raises(TrainingError, match=r"stage 2 step 5: the loss is nan.*last good checkpoint.*--resume"):
        run.train()
    ckpt = run.work / "checkpoint"
    assert read_state(ckpt)["stage"] == 2 and read_state(ckpt)["step"] == 4
    fresh = Run(recipe, ApplyOptions(resume=True))
    fresh.setup()
    load_student(ckpt, fresh.student)  # the last checkpoint loads into a freshly built student
    assert all(torch.isfinite(p).all() for p in fresh.student.parameters())
    assert not Path(recipe.output.dir).exists()  # no half-written student


KILLER = """
import os, signal, sys
import verify.runner as runner
original = runner.StageRunner._micro_steps
def killing(self, step):
    if self.stage == 2 and step == 5:   # after the checkpoint at step 4
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, step)
runner.StageRunner._micro_steps = killing
from surgery.cli import main
sys.exit(main(sys.argv[1:]))
"""


FINAL_WRITE_KILLER = """
import os, signal, sys
import surgery.student as student
original = student.save_student
def killing(directory, *args, **kwargs):
    original(directory, *args, **kwargs)   # the whole student written into the temporary directory ...
    os.kill(os.getpid(), signal.SIGKILL)   # ... and killed before the rename that makes it the output
student.save_student = killing
from surgery.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(args: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "surgery", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_kill_during_stage2_and_the_final_write_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    common = ["-q", "apply", str(TINY), "stages.stage2.tokens=3072", "stages.stage2.checkpoint_every=2"]
    killed = _cli([*common, "--out", str(tmp_path / "resumed")], script=KILLER)
    assert killed.returncode == -9, killed.stderr
    state = json.loads((tmp_path / "resumed.partial" / "checkpoint" / "state.json").read_text())
    assert (state["stage"], state["step"], state["completed"]) == (2, 4, [1])
    assert not (tmp_path / "resumed").exists()

    refused = _cli([*common, "--out", str(tmp_path / "resumed")])
    assert refused.returncode == 2 and "--resume" in refused.stderr

    killed_again = _cli([*common, "--out", str(tmp_path / "resumed"), "--resume"], script=FINAL_WRITE_KILLER)
    assert killed_again.returncode == -9, killed_again.stderr
    strays = list(tmp_path.glob(".resumed.*.tmp"))
    assert len(strays) == 1 and (strays[0] / "model.safetensors").is_file()  # killed during the final write
    assert not (tmp_path / "resumed").exists()

    resumed = _cli([*common, "--out", str(tmp_path / "resumed"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed"]  # no stray temporary, no work directory left
    straight = _cli([*common, "--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr

    a = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["stage"] == 2] == list(range(1, 13))  # no step logged twice


def test_existing_output_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(Exception, match="already exists; pass --overwrite"):
        Run(tiny(tmp_path), ApplyOptions()).setup()


def test_verify_writes_report_for_a_student(tmp_path: Path) -> None:
    out = apply(tiny(tmp_path, "stages.stage1.enabled=false", "stages.stage2.enabled=false"))
    from surgery.options import EvalOptions

    text = verify_student(str(out), EvalOptions(tokens=512, seq_len=64, batch_size=2, device="cpu"))
    report = json.loads((out / "verify" / "report.json").read_text())
    assert report["teacher"] == "random:llama" and report["tokens"] > 0
    assert len(report["stage1"]["per_node"]) == 4 and len(report["stage2"]["per_block"]) == 4
    assert report["perplexity"]["student"] > 1 and 0 <= report["top1_agreement"] <= 1
    assert "top-1 agreement" in text and (out / "verify" / "per_layer.png").is_file()
