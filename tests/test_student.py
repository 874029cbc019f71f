"""Saving and loading student directories in-process: layout, config, tied weights, shards, dtypes, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import surgery
from surgery.cache import SurgeryCache
from surgery.errors import StudentError
from surgery.hf_conventions import output_cache
from surgery.rewriter import rewrite
from surgery.student import load, load_tokenizer, save, validate
from surgery.teacher import load_teacher

pytestmark = pytest.mark.hf_contract  # also run on the oldest supported and the newest transformers (.ci/run)

RULE = {"mixer": "discrete_mamba2", "params": {"d_state": 16, "chunk_size": 8}}


def ids(b: int = 2, L: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 260, (b, L), generator=torch.Generator().manual_seed(seed))


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Make every mixer parameter non-trivial (so a tensor mix-up shows in the logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "self_attn" in name or "attn" in name or "attention" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def make_student(family: str, rules: list | None = None, noise: bool = True) -> tuple:
    teacher = load_teacher(f"random:{family}")
    student, plan = rewrite(teacher.model, [RULE] if rules is None else rules)
    if noise:
        perturb(student)
    return teacher, student.eval(), plan


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gpt_neox", "opt"])
def test_save_load_identical_logits(tmp_path: Path, family: str) -> None:
    teacher, student, plan = make_student(family)
    out = save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan, teacher=teacher)
    loaded = surgery.load(out)
    assert type(loaded).__name__ == type(student).__name__ and not loaded.training
    assert torch.equal(logits(student, ids()), logits(loaded, ids()))


def test_hybrid_with_kept_attention(tmp_path: Path) -> None:
    rules = [{"mixer": "keep", "layers": [1]}, {"mixer": "mamba2", "layers": [0, 2], "params": {"d_state": 8}}]
    teacher, student, plan = make_student("llama", rules)
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan, teacher=teacher)
    section = json.loads((tmp_path / "s" / "config.json").read_text())["surgery"]
    assert [(n["path"], n["rule"], n["mixer"]) for n in section["nodes"]] == [
        ("model.layers.0.self_attn", "mamba2", "mamba2"),
        ("model.layers.1.self_attn", "keep", None),
        ("model.layers.2.self_attn", "mamba2", "mamba2"),
    ]
    loaded = load(tmp_path / "s")
    assert type(loaded.model.layers[1].self_attn).__name__ == "LlamaAttention"
    assert type(loaded.model.layers[3].self_attn).__name__ == "LlamaAttention"
    assert torch.equal(logits(student, ids()), logits(loaded, ids()))
    card = (tmp_path / "s" / "README.md").read_text()
    assert "(kept: rule `keep`)" in card and "2 of 4 attention nodes replaced, 1 kept" in card


def test_config_and_layout(tmp_path: Path) -> None:
    teacher, student, plan = make_student("llama")
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan, teacher=teacher)
    d = tmp_path / "s"
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "provenance.json",
            "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama" and cfg["dtype"] == "float32"
    s = cfg["surgery"]
    assert s["version"] == 1 and s["teacher"] == "random:llama" and s["dtype"] == "float32"
    assert s["nodes"] == plan.nodes() and s["rules"] == plan.rules
    assert all(n["params"]["d_state"] == 16 and n["params"]["n_v_heads"] == 4 for n in s["nodes"])  # resolved
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["surgery_version"] == surgery.__version__
    assert prov["packages"]["torch"] and prov["packages"]["transformers"] and prov["python"]
    assert prov["teacher"]["ref"] == "random:llama" and prov["created_utc"].endswith("+00:00")
    assert set(prov["weights_sha256"]) == {"model.safetensors"}
    info = validate(d, checksums=True)
    assert info.summary()["replaced"] == 4 and info.tokenizer
    assert load_tokenizer(d)("hi")["input_ids"] == teacher.tokenizer("hi")["input_ids"]


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_tied_weights_stored_once_and_tied_after_load(tmp_path: Path, family: str) -> None:
    teacher, student, plan = make_student(family)
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan)
    with safe_open(str(tmp_path / "s" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys
    section = json.loads((tmp_path / "s" / "config.json").read_text())["surgery"]
    assert "lm_head.weight" in section["tied"]
    loaded = load(tmp_path / "s")
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_sharded_save(tmp_path: Path) -> None:
    teacher, student, plan = make_student("phi")
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan, shard_size="200KB")
    d = tmp_path / "s"
    shards = sorted(p.name for p in d.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(p.numel() * p.element_size() for p in student.state_dict().values())
    assert torch.equal(logits(student, ids()), logits(load(d), ids()))


def test_bf16_student_and_dtype_on_load(tmp_path: Path) -> None:
    teacher, student, plan = make_student("llama")
    student = student.to(torch.bfloat16)
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["surgery"]["dtype"] == "bfloat16"
    loaded = load(tmp_path / "s")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(student, ids()), logits(loaded, ids()))
    as_f32 = load(tmp_path / "s", dtype="float32")
    assert {p.dtype for p in as_f32.parameters()} == {torch.float32}
    assert torch.equal(as_f32.model.norm.weight, student.model.norm.weight.float())


def test_load_casts_and_overrides_attention(tmp_path: Path) -> None:
    rules = [{"mixer": "discrete_mamba2", "layers": [0, 1], "params": {"d_state": 16}}]  # layers 2, 3 keep attention
    teacher, student, plan = make_student("llama", rules)
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["surgery"]["attn_implementation"] == "eager"
    half = load(tmp_path / "s", dtype=torch.bfloat16, attn_implementation="sdpa")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.config._attn_implementation == "sdpa"
    assert torch.equal(half.model.layers[0].self_attn.B_proj.weight, student.model.layers[0].self_attn.B_proj.weight.bfloat16())
    diff = (logits(half, ids()).float() - logits(student, ids())).abs().max().item()
    assert diff < 0.05  # bf16 rounding only


def test_mixed_dtype_tensor_recorded(tmp_path: Path) -> None:
    teacher, student, plan = make_student("llama")
    layer = student.model.layers[0].self_attn
    layer.D.data = layer.D.data.double()  # one tensor kept in another dtype
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan)
    section = json.loads((tmp_path / "s" / "config.json").read_text())["surgery"]
    assert section["dtypes"] == {"model.layers.0.self_attn.D": "float64"}
    assert load(tmp_path / "s").model.layers[0].self_attn.D.dtype == torch.float64


def test_save_without_plan_or_recipe(tmp_path: Path) -> None:
    teacher, student, plan = make_student("qwen2")
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer)
    nodes = json.loads((tmp_path / "s" / "config.json").read_text())["surgery"]["nodes"]
    assert nodes == plan.nodes()
    assert torch.equal(logits(student, ids()), logits(load(tmp_path / "s"), ids()))


def test_identity_student(tmp_path: Path) -> None:
    teacher, student, plan = make_student("llama", rules=[], noise=False)
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan)
    loaded = load(tmp_path / "s")
    assert torch.equal(logits(teacher.model, ids()), logits(loaded, ids()))


def test_resave_of_loaded_student(tmp_path: Path) -> None:
    teacher, student, plan = make_student("gpt2")
    save(student, tmp_path / "a", tokenizer=teacher.tokenizer, plan=plan)
    again = load(tmp_path / "a")
    save(again, tmp_path / "b", tokenizer=load_tokenizer(tmp_path / "a"))
    assert torch.equal(logits(student, ids()), logits(load(tmp_path / "b"), ids()))


def test_save_refuses_existing_and_plan_mismatch(tmp_path: Path) -> None:
    teacher, student, plan = make_student("llama")
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan)
    with pytest.raises(StudentError, match="already exists; pass overwrite=True"):
        save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan)
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan, overwrite=True)
    _, _, other_plan = make_student("llama", [{"mixer": "discrete_mamba2", "layers": [0]}])
    with pytest.raises(StudentError, match="pass the plan returned together with this student"):
        save(student, tmp_path / "t", tokenizer=teacher.tokenizer, plan=other_plan)
    assert not (tmp_path / "t").exists()  # nothing half-written


def test_loaded_student_uses_recurrent_cache(tmp_path: Path) -> None:
    teacher, student, plan = make_student("llama")
    save(student, tmp_path / "s", tokenizer=teacher.tokenizer, plan=plan)
    loaded = load(tmp_path / "s")
    out = loaded(ids(), use_cache=True)
    assert isinstance(output_cache(out), SurgeryCache)
