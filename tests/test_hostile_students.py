"""Tampered student directories from issue #19: non-finite weights, weight files that are links, folders or
pipes, and a config asking for far more layers than the weights hold."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_student_tamper import base, student  # noqa: F401 - fixtures: one good student, a fresh copy per test
from test_student_tamper import expect as refused

from surgery.cli import main
from surgery.errors import StudentError
from surgery.student import load, validate
from surgery.student.sizes import stored_layers


def poison(d: Path, names: list[str], value: float) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    for name in names:
        tensors[name].view(-1)[0] = value
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_named_at_load(student: Path, value: float, capsys: pytest.CaptureFixture[str]) -> None:
    poison(student, ["model.norm.weight"], value)
    refused(student, "tensor model.norm.weight holds NaN or infinite values")
    assert main(["eval", str(student), "--device", "cpu", "--tokens", "64", "--seq-len", "32"]) == 2
    assert "model.norm.weight holds NaN or infinite values" in capsys.readouterr().err


def test_many_non_finite_tensors_name_three_and_count_the_rest(student: Path) -> None:
    names = sorted(load_file(str(student / "model.safetensors")))[:5]
    poison(student, names, float("nan"))
    refused(student, f"tensor {', '.join(names[:3])} (and 2 more) holds NaN")


def test_weight_link_out_of_the_directory_is_refused(student: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    (student / "model.safetensors").rename(outside)
    (student / "model.safetensors").symlink_to(outside)
    refused(student, f"is a link to {outside}, outside the student directory")
    with pytest.raises(StudentError, match="outside the student directory"):
        validate(student)


def test_weight_link_to_dev_zero_is_refused(student: Path) -> None:
    (student / "model.safetensors").unlink()
    (student / "model.safetensors").symlink_to("/dev/zero")
    refused(student, "is a link to /dev/zero, outside the student directory")


def test_weight_link_inside_the_directory_is_followed(student: Path) -> None:
    (student / "model.safetensors").rename(student / "weights.bin.safetensors")
    (student / "model.safetensors").symlink_to("weights.bin.safetensors")
    assert load(student) is not None


def test_broken_weight_link_is_named(student: Path) -> None:
    (student / "model.safetensors").unlink()
    (student / "model.safetensors").symlink_to("gone.safetensors")
    refused(student, "model.safetensors is a broken link (to gone.safetensors)")


def test_weights_file_that_is_a_folder_or_a_pipe_is_named(student: Path) -> None:
    (student / "model.safetensors").unlink()
    (student / "model.safetensors").mkdir()
    refused(student, "model.safetensors is a directory, not a safetensors file")
    (student / "model.safetensors").rmdir()
    os.mkfifo(student / "model.safetensors")
    refused(student, "model.safetensors is a named pipe, not a safetensors file")


def test_huge_layer_count_is_refused_before_building(student: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = json.loads((student / "config.json").read_text())
    config["num_hidden_layers"] = 100_000
    (student / "config.json").write_text(json.dumps(config))
    import surgery.student.validation as validation

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built")

    monkeypatch.setattr(validation, "build_model", never)
    refused(student, "says num_hidden_layers: 100000, but the weight files hold 4 layers")
    with pytest.raises(StudentError, match="the weight files hold 4 layers"):
        validate(student)


def test_layer_count_that_is_no_number_is_refused(student: Path) -> None:
    config = json.loads((student / "config.json").read_text())
    config["num_hidden_layers"] = True
    (student / "config.json").write_text(json.dumps(config))
    refused(student, "num_hidden_layers is True, not a layer count")


def test_stored_layers_counts_the_largest_stack() -> None:
    names = [f"model.layers.{i}.mlp.weight" for i in range(4)] + ["vision.blocks.0.w", "lm_head.weight"]
    assert stored_layers(names) == 4
    assert stored_layers([f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)]) == 3
    assert stored_layers(["embed.weight"]) == 0


def test_a_good_student_still_loads_and_generates(base: Path) -> None:  # noqa: F811
    model = load(base / "good")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)
