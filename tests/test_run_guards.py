"""``surgery apply`` guards from issue #19: one run per output (lock), budgets that would repeat the data,
a full disk, and leftovers of a killed run."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError
from safetensors.torch import load_file

from surgery.cli import main
from surgery.errors import DataError, SurgeryError, TrainingError
from surgery.io import tidy_atomic_leftovers
from surgery.options import ApplyOptions
from surgery.pipeline import Run, apply
from surgery.recipe import Recipe
from surgery.run_lock import LOCK, hold_work_dir, read_holder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
ONE_STEP = ["verify.tokens=128", *(f"stages.stage{s}.tokens=256" for s in (1, 2, 3))]

HOLDER = """
import sys
from pathlib import Path
from surgery.run_lock import hold_work_dir
with hold_work_dir(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def tiny(tmp_path: Path, *overrides: str) -> Recipe:
    return Recipe.load(TINY, [f"output.dir={tmp_path / 'out'}", *overrides])


# --------------------------------------------------------------------------- one run per output


def test_second_run_is_refused_naming_the_holder_then_a_stale_lock_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "out.partial"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"], ["--restart"]):
            assert main(["-q", "apply", str(TINY), "--out", str(tmp_path / "out"), *extra]) == 2
            err = capsys.readouterr().err
            assert f"is in use by process {holder.pid} on " in err and "another run is writing this output" in err, err
            assert "pass --resume to continue it" not in err  # the false advice of issue #19
        assert os.listdir(work) == [LOCK] and not (tmp_path / "out").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert read_holder(work)["pid"] == holder.pid  # the dead holder's record is still there: a stale lock
    monkeypatch.setattr(logging.getLogger("surgery"), "propagate", True)  # main() routed it to stderr
    with hold_work_dir(work):
        assert read_holder(work)["pid"] == os.getpid()
    assert f"from process {holder.pid}" in caplog.text and "no longer running" in caplog.text


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-lock-left"])
def test_a_run_that_fails_in_setup_leaves_no_work_directory(tmp_path: Path, stale: bool) -> None:
    if stale:  # a run killed during its setup left its lock behind
        (tmp_path / "out.partial").mkdir()
        (tmp_path / "out.partial" / LOCK).write_text(json.dumps({"pid": 2**22 + 12345, "host": "x"}))
    recipe = tiny(tmp_path, "teacher.model=/no/such/teacher")
    with pytest.raises(SurgeryError, match="/no/such/teacher"):
        apply(recipe)
    assert sorted(os.listdir(tmp_path)) == []


def test_a_work_path_that_is_no_directory_is_named(tmp_path: Path) -> None:
    (tmp_path / "out.partial").write_text("not a directory")
    with pytest.raises(SurgeryError, match="out.partial exists and is not a directory"):
        apply(tiny(tmp_path))
    (tmp_path / "out.partial").unlink()
    (tmp_path / "out.partial" / LOCK).mkdir(parents=True)
    with pytest.raises(SurgeryError, match="cannot open the lock file"):
        apply(tiny(tmp_path))


def test_leftovers_without_a_checkpoint_are_no_interrupted_run(tmp_path: Path) -> None:
    recipe = tiny(tmp_path)
    work = tmp_path / "out.partial"
    work.mkdir()
    (work / "metrics.jsonl").write_text('{"stage": 1, "step": 1}\n')  # killed before its first checkpoint
    Run(recipe, ApplyOptions()).check_paths()  # a plain run goes ahead (and clears them: clear_work_dir)
    with pytest.raises(SurgeryError, match="nothing to resume: no checkpoint"):
        Run(recipe, ApplyOptions(resume=True)).check_paths()
    (work / "checkpoint").mkdir()
    (work / "checkpoint" / "state.json").write_text("{}")
    with pytest.raises(SurgeryError, match="an interrupted run is in .*pass --resume"):
        Run(recipe, ApplyOptions()).check_paths()


def test_tidy_restores_a_directory_moved_aside_and_removes_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint"
    old = tmp_path / ".checkpoint.old"
    old.mkdir()
    (old / "state.json").write_text("{}")
    (tmp_path / ".checkpoint.abc123.tmp").mkdir()
    (tmp_path / ".checkpointx.abc.tmp").mkdir()  # another name: left alone
    assert tidy_atomic_leftovers(target) == [tmp_path / ".checkpoint.abc123.tmp"]
    assert (target / "state.json").is_file() and not old.exists()
    assert sorted(os.listdir(tmp_path)) == [".checkpointx.abc.tmp", "checkpoint"]


# --------------------------------------------------------------------------- budgets


@pytest.fixture
def small_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i}.txt").write_text(f"note {i}: " + "state space models mix tokens with a recurrence. " * 4)
    return str(docs / "*.txt")


def test_budget_that_repeats_the_data_too_often_is_refused_with_an_estimate(tmp_path: Path, small_corpus: str) -> None:
    recipe = tiny(tmp_path, f"data.sources=[{small_corpus}]", "stages.stage1.tokens=1000000000000000")
    with pytest.raises(DataError) as err:
        apply(recipe)
    message = str(err.value)
    assert message.startswith("stages.stage1.tokens (1,000,000,000,000,000) needs ")
    assert "passes over the" in message and "more than data.max_epochs (10)" in message
    assert "the plan would take about" in message and "years or more on cpu" in message
    assert "raise data.max_epochs to repeat the data on purpose" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "docs"]  # no output, no work directory


def test_raising_max_epochs_lets_the_plan_through(tmp_path: Path, small_corpus: str) -> None:
    recipe = tiny(tmp_path, f"data.sources=[{small_corpus}]", "stages.stage3.tokens=65536", "data.max_epochs=1000")
    Run(recipe, ApplyOptions()).setup()  # no DataError; nothing trained here


# --------------------------------------------------------------------------- a full disk


def _no_space(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_at_the_final_write_says_resume_and_resume_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.pipeline as pipeline

    recipe = tiny(tmp_path, *ONE_STEP)
    real_plot = pipeline.plot_losses

    def full(records: list, path: Path) -> None:
        raise _no_space(path)

    monkeypatch.setattr(pipeline, "plot_losses", full)
    with pytest.raises(TrainingError) as err:
        apply(recipe)
    message = str(err.value)
    assert message.startswith("no space left on device (No space left on device: ")
    assert "run the same command with --resume: it continues from the last checkpoint (stages done: 1, 2, 3)" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial"]  # no student, no half-written temporary
    checkpoint = load_file(str(tmp_path / "out.partial" / "checkpoint" / "student.safetensors"))

    monkeypatch.setattr(pipeline, "plot_losses", real_plot)
    out = apply(recipe, ApplyOptions(resume=True))
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() <= checkpoint.keys() and all(saved[k].equal(checkpoint[k]) for k in saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_full_disk_at_a_checkpoint_names_where_resume_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.pipeline as pipeline

    recipe = tiny(tmp_path, *ONE_STEP)
    real_save = pipeline.save_checkpoint
    calls = {"n": 0}

    def fills_up(directory: Path, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # transfer, after stage 1, then this one: after stage 2
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  'message: "No space left on device" })')
        real_save(directory, *args, **kwargs)

    monkeypatch.setattr(pipeline, "save_checkpoint", fills_up)
    with pytest.raises(TrainingError, match=r"--resume: it continues from the last checkpoint \(stages done: 1\)"):
        apply(recipe)
    state = json.loads((tmp_path / "out.partial" / "checkpoint" / "state.json").read_text())
    assert state["completed"] == [1]
    monkeypatch.setattr(pipeline, "save_checkpoint", real_save)
    out = apply(recipe, ApplyOptions(resume=True))
    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages == [1, 2, 3]  # stage 2 ran again from the boundary, logged once
