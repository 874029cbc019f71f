"""Tampered or incomplete student directories fail with a StudentError that names the problem and the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.cli import main
from surgery.errors import StudentError
from surgery.rewriter import rewrite
from surgery.student import load, load_tokenizer, save, validate
from surgery.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
NODE = "model.layers.1.self_attn"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One good student directory (llama, all attention -> discrete_mamba2) and a sharded copy."""
    root = tmp_path_factory.mktemp("students")
    teacher = load_teacher("random:llama")
    student, plan = rewrite(teacher.model, [{"mixer": "discrete_mamba2", "params": {"d_state": 16, "chunk_size": 8}}])
    save(student, root / "good", tokenizer=teacher.tokenizer, plan=plan, teacher=teacher)
    save(student, root / "sharded", tokenizer=teacher.tokenizer, plan=plan, teacher=teacher, shard_size="200KB")
    return root


@pytest.fixture
def student(base: Path, tmp_path: Path) -> Path:
    d = tmp_path / "student"
    shutil.copytree(base / "good", d)
    return d


def edit_config(d: Path, fn: Callable[[dict], None]) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_weights(d: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def node(cfg: dict, path: str = NODE) -> dict:
    return next(n for n in cfg["surgery"]["nodes"] if n["path"] == path)


def expect(d: Path, *fragments: str) -> str:
    with pytest.raises(StudentError) as err:
        load(d)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# --------------------------------------------------------------------------- config.json


def test_missing_directory(tmp_path: Path) -> None:
    expect(tmp_path / "nope", "does not exist")


def test_missing_config(student: Path) -> None:
    (student / "config.json").unlink()
    expect(student, "has no config.json", "restore config.json")


def test_config_not_json(student: Path) -> None:
    (student / "config.json").write_text("{not json")
    expect(student, "is not valid JSON", "restore config.json")


def test_config_without_surgery_section(student: Path) -> None:
    edit_config(student, lambda c: c.pop("surgery"))
    expect(student, "has no 'surgery' section", "AutoModelForCausalLM.from_pretrained", "restore config.json")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda c: c.__setitem__("surgery", [1, 2]), "surgery must be an object"),
        (lambda c: c["surgery"].__setitem__("nodes", "all"), "surgery.nodes is missing or not a list"),
        (lambda c: c["surgery"].pop("version"), "surgery.version is missing"),
        (lambda c: node(c).pop("path"), "nodes[1].path is missing"),
        (lambda c: node(c).__setitem__("layer", "one"), "nodes[1].layer is missing or not a int"),
        (lambda c: node(c).__setitem__("params", [16]), "nodes[1].params must be an object"),
    ],
)
def test_malformed_surgery_section(student: Path, edit: Callable[[dict], None], fragment: str) -> None:
    edit_config(student, edit)
    expect(student, fragment, "restore config.json")


def test_newer_format_version(student: Path) -> None:
    edit_config(student, lambda c: c["surgery"].__setitem__("version", 99))
    expect(student, "version is 99", "upgrade surgery")


def test_unknown_mixer(student: Path) -> None:
    edit_config(student, lambda c: node(c).__setitem__("mixer", "discrete_mamba3"))
    expect(student, f"surgery.nodes[1] ({NODE})", "unknown mixer 'discrete_mamba3'", "did you mean 'discrete_mamba2'")


def test_unknown_rule(student: Path) -> None:
    edit_config(student, lambda c: node(c).__setitem__("rule", "mamba9"))
    expect(student, "unknown mixer 'mamba9'", "restore config.json")


def test_node_path_not_attention(student: Path) -> None:
    edit_config(student, lambda c: node(c).__setitem__("path", "model.layers.1.mlp"))
    expect(student, "'model.layers.1.mlp' is not an attention node", "restore config.json")


def test_invalid_params(student: Path) -> None:
    edit_config(student, lambda c: node(c)["params"].__setitem__("d_state", -3))
    expect(student, f"({NODE}) cannot be rebuilt", "d_state")


def test_edited_params_no_longer_fit_weights(student: Path) -> None:
    edit_config(student, lambda c: node(c)["params"].__setitem__("d_state", 8))
    expect(student, f"node {NODE} (discrete_mamba2, params", "has shape [32, 64]", "shape [16, 64]",
           "config.json no longer fits the saved weights")


def test_edited_family_size(student: Path) -> None:
    edit_config(student, lambda c: c.__setitem__("intermediate_size", 100))
    expect(student, "model.layers.0.mlp.gate_proj.weight", "config.json no longer fits")


# --------------------------------------------------------------------------- weights


def test_missing_tensor(student: Path) -> None:
    edit_weights(student, lambda t: t.pop(f"{NODE}.B_proj.weight"))
    expect(student, f"tensor {NODE}.B_proj.weight missing from the weight files", "copy the directory again")


def test_wrong_tensor_shape(student: Path) -> None:
    edit_weights(student, lambda t: t.__setitem__("model.norm.weight", torch.ones(65)))
    expect(student, "tensor model.norm.weight in model.safetensors has shape [65]", "expects [64]")


def test_unexpected_tensor(student: Path) -> None:
    edit_weights(student, lambda t: t.__setitem__(f"{NODE}.q_proj.weight", torch.zeros(64, 64)))
    expect(student, f"unexpected tensor {NODE}.q_proj.weight", "has no such parameter")


def test_wrong_dtype(student: Path) -> None:
    edit_weights(student, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].half()))
    expect(student, "tensor model.norm.weight in model.safetensors is float16, but config.json records float32")


def test_missing_weights_file(student: Path) -> None:
    (student / "model.safetensors").unlink()
    expect(student, "has no weights: model.safetensors is missing", "re-run surgery apply")


def test_pickle_weights_refused(student: Path) -> None:
    (student / "model.safetensors").rename(student / "pytorch_model.bin")
    expect(student, "only pickle weights (pytorch_model.bin)", "surgery never loads")


@pytest.mark.parametrize("cut", [10, 4000])
def test_corrupt_weights_file(student: Path, cut: int) -> None:
    data = (student / "model.safetensors").read_bytes()
    (student / "model.safetensors").write_bytes(data[:cut])  # truncated header / truncated data
    expect(student, "cannot read", "model.safetensors", "corrupt or truncated")


def test_missing_shard(base: Path, tmp_path: Path) -> None:
    d = tmp_path / "s"
    shutil.copytree(base / "sharded", d)
    assert load(d) is not None
    shard = sorted(d.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    expect(d, f"shard {shard.name} listed in model.safetensors.index.json is missing")


def test_shards_without_index(base: Path, tmp_path: Path) -> None:
    d = tmp_path / "s"
    shutil.copytree(base / "sharded", d)
    (d / "model.safetensors.index.json").unlink()
    expect(d, "no model.safetensors.index.json", "copy the index file too")


def test_index_disagrees_with_shards(base: Path, tmp_path: Path) -> None:
    d = tmp_path / "s"
    shutil.copytree(base / "sharded", d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    name = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][name] = second
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    expect(d, f"says tensor {name} is in {second}, but it is not there")


def test_checksum_mismatch_detected_by_validate(student: Path) -> None:
    edit_weights(student, lambda t: t["model.norm.weight"].add_(1.0))
    assert load(student) is not None  # structurally fine ...
    with pytest.raises(StudentError, match="sha256 mismatch"):
        validate(student, checksums=True)  # ... but not the file that was saved


# --------------------------------------------------------------------------- tokenizer and CLI


def test_missing_tokenizer(student: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (student / name).unlink()
    assert load(student) is not None  # the weights alone still load
    for check in (load_tokenizer, validate):
        with pytest.raises(StudentError, match="has no tokenizer .* copy the teacher's tokenizer files"):
            check(student)


def test_cli_generate_and_eval_report_errors(student: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_weights(student, lambda t: t.pop("model.norm.weight"))
    for argv in (["generate", str(student), "hi", "--device", "cpu"], ["eval", str(student), "--device", "cpu"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "model.norm.weight missing" in err and "Traceback" not in err


def test_cli_subprocess_exit_2_without_traceback(student: Path) -> None:
    (student / "tokenizer.json").unlink()
    (student / "tokenizer_config.json").unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "surgery", "generate", str(student), "hello", "--device", "cpu"],
                          capture_output=True, check=False, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "has no tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_tampered_student_config_is_not_taken_for_a_teacher(student: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a directory with student files whose config lost its section: an error, not a silent teacher load
    edit_config(student, lambda c: c.pop("surgery"))
    assert main(["generate", str(student), "hi", "--device", "cpu"]) == 2
    assert "has no 'surgery' section" in capsys.readouterr().err
