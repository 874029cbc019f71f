"""Native export: plain transformers loads ``surgery export --to bamba`` and computes the student exactly.

Students are tiny random teachers of each Llama-layout family rewritten with ``mamba2`` mixers,
every parameter perturbed (so a tensor mix-up shows in the logits), saved, exported, and loaded
back with ``AutoModelForCausalLM.from_pretrained`` -- no surgery code, no remote code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import surgery
from surgery.cli import main
from surgery.hf_conventions import output_cache
from surgery.io import sha256_file
from surgery.native import ExportError
from surgery.native.bamba import GROUPED_NORM_SINCE, grouped_gated_norm
from surgery.native.exporting import EXPORT_PROVENANCE
from surgery.random_models import random_model
from surgery.recipe import ReplaceRule
from surgery.student import is_student_dir, load_model_ref
from surgery.tokenizers import byte_tokenizer

pytestmark = pytest.mark.hf_contract  # Bamba's forward, cache and generate: also run on the oldest transformers

TOL = 1e-5  # fp32, CPU: the bound (measured ~3e-6 on these models)


def mamba2(**params: Any) -> dict[str, Any]:
    return {"mixer": "mamba2", "params": {"d_state": 8, "chunk_size": 8, "ngroups": 1, **params}}


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter moved off its init (norm weights, D, dt_bias, biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def build(family: str, rules: list[dict[str, Any]], **config: Any) -> tuple[torch.nn.Module, Any]:
    """A perturbed student of ``random:<family>`` (``config`` overrides the teacher's); mamba2 norm_eps = the teacher's."""
    teacher = random_model(family, **config)
    eps = teacher.config.rms_norm_eps
    rules = [{**r, "params": {"norm_eps": eps, **r["params"]}} if r["mixer"] == "mamba2" else r for r in rules]
    student, plan = surgery.rewrite(teacher, [ReplaceRule(**r) for r in rules])
    perturb(student)
    return student.eval(), plan


def saved(tmp_path: Path, family: str, rules: list[dict[str, Any]], **config: Any) -> Path:
    student, plan = build(family, rules, **config)
    return surgery.save(student, tmp_path / "student", tokenizer=byte_tokenizer(), plan=plan)


def ids(b: int = 2, L: int = 21, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 300, (b, L), generator=torch.Generator().manual_seed(seed))


def greedy(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, Any]:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    return out.sequences, output_cache(out)


def assert_native_is_student(student_dir: Path, out: Path) -> torch.nn.Module:
    """Plain transformers' model of ``out`` == surgery.load(student_dir): logits and cached greedy tokens."""
    native = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    student = surgery.load(student_dir, dtype=torch.float32)
    assert type(native).__name__ == "BambaForCausalLM"
    with torch.no_grad():
        x = ids()
        diff = (native(x).logits - student(x).logits).abs().max().item()
        assert diff <= TOL, diff
        (seq_n, cache_n), (seq_s, _) = greedy(native, x[:, :7]), greedy(student, x[:, :7])
    assert type(cache_n).__module__.startswith("transformers.")  # the native model's own cache, not surgery's
    assert torch.equal(seq_n, seq_s)
    return native


# (family, rules, teacher config overrides): hybrid and fully converted, per family
CASES = {
    "llama-hybrid": ("llama", [{"layers": [1, 3], "mixer": "keep"}, mamba2()], {}),
    "llama-full": ("llama", [mamba2()], {}),
    "mistral-hybrid": ("mistral", [{"layers": [0], "mixer": "keep"}, mamba2()], {}),
    "mistral-full": ("mistral", [mamba2()], {}),
    "qwen2-hybrid": ("qwen2", [{"layers": [2], "mixer": "keep"}, mamba2()], {}),  # q/k/v biases, no o_proj bias
    "qwen2-full": ("qwen2", [mamba2()], {}),
    "qwen3-full": ("qwen3", [mamba2()], {}),  # q/k norms leave with the attention
    "every-option": ("llama", [{"layers": [2], "mixer": "keep"}, mamba2(conv_bias=False, d_conv=3)],
                     {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True, "head_dim": 32}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_native_model_computes_the_student(tmp_path: Path, case: str) -> None:
    family, rules, config = CASES[case]
    student_dir = saved(tmp_path, family, rules, **config)
    out = surgery.export(student_dir, tmp_path / "bamba")
    native = assert_native_is_student(student_dir, out)
    kept = [r["layers"] for r in rules if r["mixer"] == "keep"]
    if kept:
        assert native.config.attn_layer_indices == kept[0]
    else:  # fully converted: one identity attention layer appended, so that transformers' cached generate runs
        assert native.config.num_hidden_layers == 5 and native.config.attn_layer_indices == [4]
        assert all(not p.any() for n, p in native.model.layers[4].named_parameters() if "layernorm" not in n)


def test_grouped_norm_exact_where_transformers_groups_it(tmp_path: Path) -> None:
    """ngroups > 1 (B/C per head, the mamba2 default): Bamba's gated RMSNorm is per group from 5.23 only."""
    student_dir = saved(tmp_path, "llama", [{"layers": [3], "mixer": "keep"}, mamba2(ngroups=4)])
    if grouped_gated_norm():
        assert_native_is_student(student_dir, surgery.export(student_dir, tmp_path / "bamba"))
        return
    with pytest.raises(ExportError, match=f"ngroups is 4.*per group from {GROUPED_NORM_SINCE}"):
        surgery.export(student_dir, tmp_path / "bamba")
    assert not (tmp_path / "bamba").exists()


def test_left_padded_batch_generates_as_the_student(tmp_path: Path) -> None:
    """Padding tokens leave no trace in either model's state: the same logits on real tokens, the same greedy tokens."""
    student_dir = saved(tmp_path, "llama", [{"layers": [1], "mixer": "keep"}, mamba2()])
    native = AutoModelForCausalLM.from_pretrained(surgery.export(student_dir, tmp_path / "bamba")).eval()
    student = surgery.load(student_dir)
    x, mask = ids(L=11), torch.ones(2, 11, dtype=torch.long)
    x[0, :4], mask[0, :4] = 0, 0
    with torch.no_grad():
        diff = (native(x, attention_mask=mask).logits - student(x, attention_mask=mask).logits)[mask.bool()]
        assert diff.abs().max().item() <= TOL
        kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
        assert torch.equal(native.generate(x, **kwargs), student.generate(x, **kwargs))


def test_bfloat16_student_keeps_its_dtype(tmp_path: Path) -> None:
    student, plan = build("llama", [{"layers": [0], "mixer": "keep"}, mamba2()])
    student_dir = surgery.save(student.to(torch.bfloat16), tmp_path / "student", tokenizer=byte_tokenizer(), plan=plan)
    out = surgery.export(student_dir, tmp_path / "bamba")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert_native_is_student(student_dir, out)  # both upcast from the same bf16 values


def test_files_are_native_and_carry_provenance(tmp_path: Path) -> None:
    student_dir = saved(tmp_path, "llama", [{"layers": [1], "mixer": "keep"}, mamba2()])
    out = surgery.export(student_dir, tmp_path / "bamba")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bamba" and config["architectures"] == ["BambaForCausalLM"]
    assert "auto_map" not in config and "surgery" not in config
    assert not list(out.glob("*.py")) and not is_student_dir(out)
    assert AutoTokenizer.from_pretrained(out)("héllo").input_ids == byte_tokenizer()("héllo").input_ids
    assert (out / "generation_config.json").read_text() == (student_dir / "generation_config.json").read_text()
    prov = json.loads((out / EXPORT_PROVENANCE).read_text())
    assert prov["student"] == json.loads((student_dir / "provenance.json").read_text())
    assert prov["layers"] == {"mamba": [0, 2, 3], "attention": [1], "identity_attention": []}
    assert prov["check"]["max_abs_logit_diff"] <= TOL and prov["check"]["greedy_equal"]
    assert prov["weights_sha256"]["model.safetensors"] == sha256_file(out / "model.safetensors")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "trust_remote_code" not in card
    assert "## The student's model card" in card and "### What was replaced" in card
    loaded = load_model_ref(str(out))  # surgery's own generate / eval take the export as a plain HF model
    assert loaded.kind == "teacher" and type(loaded.model).__name__ == "BambaForCausalLM"


def test_a_wrong_tensor_is_caught_and_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The closing check is real: a layout mistake (B and C swapped) fails it and the output never appears."""
    from surgery.native import bamba_tensors

    fused = bamba_tensors.mamba2_mixer

    def swapped(take: Any, src: str) -> dict[str, torch.Tensor]:
        out = fused(take, src)
        w = out["in_proj.weight"]  # rows [z 64 | x 64 | B 8 | C 8 | dt 4] here
        out["in_proj.weight"] = torch.cat([w[:128], w[136:144], w[128:136], w[144:]])
        return out

    monkeypatch.setattr(bamba_tensors, "mamba2_mixer", swapped)
    student_dir = saved(tmp_path, "llama", [{"layers": [3], "mixer": "keep"}, mamba2()])
    with pytest.raises(ExportError, match="does not compute the student"):
        surgery.export(student_dir, tmp_path / "bamba")
    assert not (tmp_path / "bamba").exists() and not list(tmp_path.glob(".bamba*"))


def test_cli_exports_and_refuses_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    student_dir = saved(tmp_path, "llama", [{"layers": [0], "mixer": "keep"}, mamba2()])
    out = tmp_path / "bamba"
    assert main(["-q", "export", str(student_dir), "--to", "bamba", "-o", str(out)]) == 0
    assert "bamba checkpoint written to" in capsys.readouterr().out and (out / "model.safetensors").is_file()
    for args, named in [
        (["-o", str(out)], "already exists; pass --overwrite"),
        (["-o", str(student_dir), "--overwrite"], "would replace the student"),
        (["--to", "bambaa", "-o", str(tmp_path / "x")], "did you mean 'bamba'"),
        ([], "no output directory"),
        (["-o", str(tmp_path / "y")], "does not exist"),  # with a student dir that is not there (below)
    ]:
        src = str(tmp_path / "missing") if named == "does not exist" else str(student_dir)
        assert main(["-q", "export", src, *args]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert main(["-q", "export", str(student_dir), "-o", str(out), "--overwrite"]) == 0


def test_discrete_mamba2_student_is_refused_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    student_dir = saved(tmp_path, "llama", [{"mixer": "discrete_mamba2", "params": {"d_state": 8}}])
    assert main(["-q", "export", str(student_dir), "-o", str(tmp_path / "bamba")]) == 2
    err = capsys.readouterr().err
    assert "mixer 'discrete_mamba2' in layers 0, 1, 2, 3" in err and "x B^T (not dt x B^T)" in err
    assert "nothing was written" in err and not (tmp_path / "bamba").exists()
