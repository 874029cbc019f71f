"""``surgery eval``: held-out perplexity of a teacher reference or a student directory, one code path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from surgery.cli import main
from surgery.evaluate import evaluate_reference, heldout_for_eval, mean_nll
from surgery.options import EvalOptions
from surgery.rewriter import rewrite
from surgery.student import load, save
from surgery.teacher import load_teacher

OPTS = EvalOptions(tokens=512, seq_len=64, batch_size=4, device="cpu")
KEYS = {"model", "kind", "data", "tokens", "seq_len", "perplexity", "nll"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    teacher = load_teacher("random:llama")
    out = {}
    for name, rules in (("identity", []), ("mamba", [{"mixer": "discrete_mamba2", "params": {"d_state": 16}}])):
        student, plan = rewrite(teacher.model, rules)
        out[name] = save(student, root / name, tokenizer=teacher.tokenizer, plan=plan, teacher=teacher)
    return out


def test_teacher_reference() -> None:
    result = evaluate_reference("random:llama", OPTS)
    assert KEYS <= set(result) and result["kind"] == "teacher"
    assert result["tokens"] == 512 and result["seq_len"] == 64 and result["predicted"] == 8 * 63
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]))
    assert 100 < result["perplexity"] < 2000  # random model, vocabulary 320


def test_identity_student_scores_like_its_teacher(dirs: dict[str, Path]) -> None:
    teacher = evaluate_reference("random:llama", OPTS)
    student = evaluate_reference(str(dirs["identity"]), OPTS)
    assert student["kind"] == "student" and student["nll"] == teacher["nll"]


def test_student_directory_matches_in_memory_model(dirs: dict[str, Path]) -> None:
    result = evaluate_reference(str(dirs["mamba"]), OPTS)
    model = load(dirs["mamba"])
    teacher = load_teacher("random:llama")
    batches, _ = heldout_for_eval(teacher.tokenizer, OPTS)
    nll, count = mean_nll(model, batches)
    assert result["nll"] == nll and result["predicted"] == count
    assert result["heldout_disjoint_from_training"] is None  # saved without a recipe: unknown


def test_cli_eval_prints_json(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "eval", str(dirs["mamba"]), "--tokens", "256", "--seq-len", "64", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result) and result["kind"] == "student" and result["tokens"] == 256


def test_unknown_reference_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "random:llamma", "--device", "cpu"]) == 2
    assert "did you mean 'llama'" in capsys.readouterr().err
