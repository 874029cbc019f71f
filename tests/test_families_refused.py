"""Failures before training: refused families, unregistered ones, adapters a fresh process would not find.

Each is refused by ``surgery plan`` and at the start of ``surgery apply`` (exit 2, one message naming the
family and the fix), and ``apply`` leaves neither the output directory nor ``<out>.partial`` behind. A
third-party adapter declared under the ``surgery.adapters`` entry point group is found in a fresh process,
so a student built with it loads there.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from rewrites.adapters import ADAPTERS, FamilyAdapter, register_adapter
from surgery.cli import main
from surgery.tokenizers import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
ARCEE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 320}  # Llama layout, no built-in adapter

TINY_CONFIGS = {
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 320},
    "deepseek_v3": {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 8, "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                    "vocab_size": 320},
    "arcee": ARCEE,
}


def saved(tmp_path: Path, model_type: str) -> Path:
    """A tiny random ``model_type`` model saved with the byte tokenizer."""
    d = tmp_path / model_type
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    byte_tokenizer().save_pretrained(str(d))
    return d


def refused(tmp_path: Path, teacher: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """(plan's error, apply's error); both exit 2 and apply writes nothing."""
    assert main(["plan", str(TINY), f"teacher.model={teacher}", "-q"]) == 2
    plan_err = capsys.readouterr().err
    out = tmp_path / "student"
    assert main(["apply", str(TINY), f"teacher.model={teacher}", "--out", str(out), "-q"]) == 2
    apply_err = capsys.readouterr().err
    assert not out.exists() and not out.with_name("student.partial").exists()
    return plan_err, apply_err


@pytest.mark.parametrize("model_type, why", [
    ("bloom", "adds the residual inside itself"),
    ("deepseek_v3", "multi-head latent attention"),
])  # fmt: skip
def test_design_limits_are_refused_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   model_type: str, why: str) -> None:
    for err in refused(tmp_path, saved(tmp_path, model_type), capsys):
        assert f"model_type {model_type!r} cannot be converted" in err and why in err
        assert err.count("error:") == 1 and "Traceback" not in err


def test_family_without_adapter_says_how_to_add_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for err in refused(tmp_path, saved(tmp_path, "arcee"), capsys):
        assert "no attention adapter for model_type 'arcee'" in err
        assert "surgery.adapters" in err and "Adding a family" in err


def test_adapter_registered_by_user_code_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """surgery.load in another process would not find it: refused before stage 1, not after stage 3."""

    @register_adapter("arcee")
    class ArceeAdapter(FamilyAdapter):
        pass

    try:
        for err in refused(tmp_path, saved(tmp_path, "arcee"), capsys):
            assert "registered by code this process ran" in err and "'surgery.adapters'" in err
            assert "nothing was trained or written" in err
        import logging

        import surgery

        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("arcee", **ARCEE))
        student, plan = surgery.rewrite(model, [{"type": "attention", "mixer": "discrete_mamba2"}])
        log = logging.getLogger("surgery")  # the CLI's configuration stops it propagating
        log.addHandler(caplog.handler)
        try:
            surgery.save(student, tmp_path / "api-student", plan=plan, tokenizer=byte_tokenizer())
        finally:
            log.removeHandler(caplog.handler)
        assert "surgery.load in another process would not find it" in caplog.text  # the Python API warns
    finally:
        del ADAPTERS["arcee"]


PLUGIN = '''
"""A third-party adapter package: Arcee has the Llama layout."""
from rewrites.adapters import FamilyAdapter, register_adapter


@register_adapter("arcee")
class ArceeAdapter(FamilyAdapter):
    """model.layers.{i}.self_attn.{q,k,v,o}_proj"""
'''

SAVE = """
import sys, torch, surgery
from transformers import AutoConfig, AutoModelForCausalLM
from surgery.cli import main
from surgery.tokenizers import byte_tokenizer
teacher, student, recipe = sys.argv[1:4]
config = AutoConfig.for_model("arcee", **{arcee})
AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
byte_tokenizer().save_pretrained(teacher)
assert main(["plan", recipe, "teacher.model=" + teacher, "-q"]) == 0
model = AutoModelForCausalLM.from_pretrained(teacher)
s, plan = surgery.rewrite(model, [{{"type": "attention", "mixer": "discrete_mamba2"}}])
surgery.save(s, student, tokenizer=byte_tokenizer(), plan=plan)
torch.save(s(torch.arange(3, 12)[None]).logits, student + "/expected.pt")
"""

LOAD = """
import sys, torch, surgery
student = sys.argv[1]
got = surgery.load(student)(torch.arange(3, 12)[None]).logits
want = torch.load(student + "/expected.pt")
assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
print("loaded", type(surgery.load(student).model.layers[0].self_attn).__name__)
"""


def test_plugin_adapter_is_found_in_a_fresh_process(tmp_path: Path) -> None:
    """An installed package declaring ``[surgery.adapters]``: plan, save, and load in a second fresh process."""
    site = tmp_path / "site"
    (site / "arcee_plugin").mkdir(parents=True)
    (site / "arcee_plugin" / "__init__.py").write_text(PLUGIN)
    dist = site / "arcee_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: arcee-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[surgery.adapters]\narcee = arcee_plugin\n")
    env = {"PYTHONPATH": f"{site}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    save = textwrap.dedent(SAVE.format(arcee=repr(ARCEE)))
    done = subprocess.run([sys.executable, "-c", save, str(teacher), str(student), str(TINY)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-c", LOAD, str(student)], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["loaded", "DiscreteMamba2"]


def test_directory_without_tokenizer_files_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """transformers builds an empty GPT-2 tokenizer for it; refused, not 'only 9 held-out tokens' later."""
    from surgery.random_models import random_model

    d = tmp_path / "no-tokenizer"
    random_model("gpt_neo").save_pretrained(d)  # its tokenizer class builds an empty vocabulary
    for err in refused(tmp_path, d, capsys):
        assert f"teacher directory '{d}' has no tokenizer files" in err and "tokenizer.json" in err


def test_readme_names_every_family_and_refusal() -> None:
    from rewrites.adapters import REFUSED, supported_families

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Supported families") : text.index("## Shipped recipes")]
    for name in [*supported_families(), *REFUSED]:
        assert f" {name}," in section or f" {name} " in section or f"| {name}" in section, name


def test_unrebuildable_student_is_refused_before_stage_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever would make surgery.load fail on the saved student stops apply before any training."""
    import surgery.rewriter
    from verify.runner import StageRunner

    def broken_splice(model, nodes):  # noqa: ANN001, ANN202 - stands for any rebuild failure
        raise KeyError("simulated: this node's mixer does not rebuild from its params")

    def no_training(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a stage started")

    monkeypatch.setattr(surgery.rewriter, "splice", broken_splice)
    monkeypatch.setattr(StageRunner, "run", no_training)
    out = tmp_path / "student"
    assert main(["apply", str(TINY), "teacher.model=random:qwen2_moe", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "the qwen2_moe student this recipe builds could not be loaded back" in err
    assert "simulated: this node's mixer does not rebuild" in err and "nothing was trained or written" in err
    assert not out.exists() and not out.with_name("student.partial").exists()
