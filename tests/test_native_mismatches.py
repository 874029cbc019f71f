"""What Bamba cannot express is refused, each mismatch named (checked on the module tree, nothing saved)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import surgery
from surgery.native import get_target
from surgery.native.source import Student
from surgery.random_models import random_model
from surgery.recipe import ReplaceRule


def mismatches(family: str, rules: list[dict[str, Any]], match_eps: bool = True, **config: Any) -> list[str]:
    teacher = random_model(family, **config)
    if match_eps and family != "gpt2":  # gpt2 has LayerNorm, no rms_norm_eps
        rules = [{**r, "params": {"norm_eps": teacher.config.rms_norm_eps, **r.get("params", {})}}
                 if r["mixer"] == "mamba2" else r for r in rules]
    student, _ = surgery.rewrite(teacher, [ReplaceRule(**r) for r in rules])
    return get_target("bamba").mismatches(Student(path=Path("student"), model=student, section={}))


M2 = {"mixer": "mamba2", "params": {"d_state": 8, "ngroups": 1}}
KEEP0 = {"layers": [0], "mixer": "keep"}


@pytest.mark.parametrize("family, rules, config, named", [
    ("gpt2", [M2], {}, "family 'gpt2': Bamba has the Llama decoder layout"),
    ("llama", [{"mixer": "discrete_mamba2"}], {}, "mixer 'discrete_mamba2' in layers 0, 1, 2, 3"),
    ("llama", [KEEP0, {"layers": [1], "mixer": "discrete_mamba2"}, M2], {}, "mixer 'discrete_mamba2' in layer 1:"),
    ("qwen3", [KEEP0, M2], {}, "kept attention in layer 0 has q/k norms"),
    ("mistral", [KEEP0, M2], {"sliding_window": 16}, "layer 0 uses a sliding window (16)"),
    ("qwen2", [{"layers": [3], "mixer": "keep"}, M2], {"use_sliding_window": True, "sliding_window": 16,
                                                       "max_window_layers": 2}, "layer 3 uses a sliding window"),
    ("llama", [M2], {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("llama", [{"layers": "0:2", **M2}, {"mixer": "mamba2", "params": {"d_state": 4, "ngroups": 1}}], {},
     "params.d_state differs between layers (8 in layers 0, 1; 4 in layers 2, 3)"),
    ("llama", [{"mixer": "mamba2", "params": {"d_conv": 0, "ngroups": 1}}], {}, "d_conv is 0"),
    ("llama", [{"mixer": "mamba2", "params": {"bias": True, "ngroups": 1}}], {}, "left-padded batches would differ"),
    ("llama", [{"mixer": "mamba2", "params": {"n_heads": 3, "ngroups": 1}}], {},
     "n_heads x head_dim = 48 is not a multiple of hidden_size 64"),
    ("llama", [KEEP0, M2], {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": 0.5}}, "partial_rotary_factor 0.5"),
    ("llama", [{"mixer": "keep"}], {}, "no attention node was replaced"),
])
def test_mismatch_is_named(family: str, rules: list[dict[str, Any]], config: dict[str, Any], named: str) -> None:
    found = mismatches(family, rules, **config)
    assert any(named in m for m in found), found


def test_norm_eps_must_be_the_teachers() -> None:
    found = mismatches("llama", [M2], match_eps=False)  # mamba2's default 1e-5, random llama's rms_norm_eps 1e-6
    assert found == ["mamba2 params.norm_eps 1e-05 differs from the teacher's rms_norm_eps 1e-06: Bamba's gated norm "
                     "uses rms_norm_eps; rewrite with params: {norm_eps: 1e-06}"]


def test_attention_only_mismatches_vanish_when_no_attention_is_kept() -> None:
    assert mismatches("qwen3", [M2]) == []
    assert mismatches("mistral", [M2], sliding_window=16) == []


def test_export_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    from surgery.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "surgery export runs/" in out and "--to" in out and "-o OUTPUT" in out
