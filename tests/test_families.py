"""Teacher coverage, as a new user meets it: a tiny random model of each family saved with a tokenizer.

For every accepted family: ``surgery plan`` and ``surgery diff`` (the CLI, in this process) on the
saved directory, ``surgery apply recipes/tiny.yaml teacher.model=DIR`` with one step per stage,
``surgery.load`` of what it wrote, cached generation equal to recomputation, and a load in a fresh
process. The families refused by design are refused by ``plan`` and ``apply`` before anything is
trained or written, with the reason. (The adapters' q/k/v/o readings, FX traces, splice checks and
transfer slices of every family are tested in test_adapters.py, test_graph.py, test_rewrite.py and
test_rewrite_transfer.py, which run over every family of :mod:`surgery.random_models`.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgery
from surgery.cli import main
from surgery.options import ApplyOptions
from surgery.pipeline import apply
from rewrites.adapters import get_adapter
from surgery.random_models import FUSED_LAYOUT, LLAMA_LAYOUT, random_model
from surgery.recipe import Recipe
from surgery.tokenizers import byte_tokenizer

pytestmark = pytest.mark.hf_contract  # the families' own modelling code: also on the oldest and newest transformers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
ONE_STEP = [f"stages.stage{s}.{k}={v}" for s in (1, 2, 3) for k, v in (("tokens", 128), ("tokens_per_step", 128))]
ONE_STEP += ["verify.tokens=128"]
ACCEPTED = sorted(LLAMA_LAYOUT) + sorted(FUSED_LAYOUT)
REL = 1e-4  # cached vs recomputed logits, relative to the largest logit


def teacher_dir(tmp_path: Path, family: str) -> Path:
    """A tiny random ``family`` model saved with the byte tokenizer, as a user's local teacher."""
    d = tmp_path / f"{family}-teacher"
    random_model(family).save_pretrained(d)
    byte_tokenizer().save_pretrained(str(d))
    return d


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check_cached_generation(model: torch.nn.Module) -> None:
    """Greedy generation with the recurrent cache equals a full forward over the generated sequence."""
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    model.generation_config.eos_token_id = None  # fixed-length generations
    model.generation_config.pad_token_id = 0
    out = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    full = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    assert rel_err(torch.stack(out.logits, 1), full) < REL


@pytest.mark.parametrize("family", ACCEPTED)
def test_plan_and_diff_name_the_adapter(tmp_path: Path, family: str, capsys: pytest.CaptureFixture[str]) -> None:
    d = teacher_dir(tmp_path, family)
    assert main(["plan", str(TINY), f"teacher.model={d}", "--format", "json", "-q"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["family"] == family
    assert {e["attention"]["adapter"] for e in plan["entries"]} == {type_name(family)}
    assert all(e["mixer"] == "discrete_mamba2" for e in plan["entries"])
    assert main(["diff", str(TINY), f"teacher.model={d}", "--format", "json", "-q"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff  # a non-empty diff of a fully converted model


def type_name(family: str) -> str:
    from rewrites.adapters import ADAPTERS, supported_families

    supported_families()
    return ADAPTERS[family].__name__


@pytest.mark.parametrize("family", ACCEPTED)
def test_apply_load_and_cached_generation(tmp_path: Path, family: str) -> None:
    d = teacher_dir(tmp_path, family)
    recipe = Recipe.load(TINY, [f"teacher.model={d}", f"output.dir={tmp_path / 'student'}", *ONE_STEP])
    out = apply(recipe, ApplyOptions())
    student = surgery.load(out)
    paths = [get_adapter(student).attention_path(i) for i in range(4)]
    assert {type(student.get_submodule(p)).__name__ for p in paths} == {"DiscreteMamba2"}
    report = json.loads((out / "report.json").read_text())
    assert set(report["stage1"]["per_node"]) == set(paths)
    check_cached_generation(student)


def test_students_load_in_a_fresh_process(tmp_path: Path) -> None:
    """Students of every accepted family saved here load in a new interpreter with the same logits."""
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    expected = {}
    for family in ACCEPTED:
        student, plan = surgery.rewrite(random_model(family), [{"type": "attention", "mixer": "discrete_mamba2",
                                                                "params": {"d_state": 8, "chunk_size": 4}}])
        surgery.save(student, tmp_path / family, tokenizer=byte_tokenizer(), plan=plan)
        expected[family] = student(ids).logits
    torch.save({"ids": ids, "expected": expected}, tmp_path / "expected.pt")
    code = (
        "import sys, torch, surgery\n"
        "d = sys.argv[1]; data = torch.load(d + '/expected.pt')\n"
        "for family, want in data['expected'].items():\n"
        "    got = surgery.load(d + '/' + family)(data['ids']).logits\n"
        "    err = ((got - want).abs().max() / want.abs().max()).item()\n"
        "    assert err < 1e-5, (family, err)\n"
        "print('ok', len(data['expected']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", str(len(ACCEPTED))]


@pytest.mark.parametrize("family", ACCEPTED + ["llama", "gpt2", "gpt_neox", "opt", "phi"])
def test_mixers_see_every_token_inside_the_family_model(family: str) -> None:
    """What a family hands its attention (mask, positions, cache) leaves an unpadded batch whole for the mixer:
    each mixer's output inside the model equals the mixer called on the same input alone."""
    student, _ = surgery.rewrite(random_model(family), [{"type": "attention", "mixer": "discrete_mamba2",
                                                         "params": {"d_state": 8, "chunk_size": 4}}])
    paths = [get_adapter(student).attention_path(i) for i in range(4)]
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [student.get_submodule(p).register_forward_hook(
        lambda m, args, kwargs, out, p=p: seen.__setitem__(p, (kwargs.get("hidden_states", args[0] if args else None),
                                                               out[0])), with_kwargs=True) for p in paths]
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        student(ids, attention_mask=torch.ones_like(ids))
        for h in hooks:
            h.remove()
        for p in paths:
            u, inside = seen[p]
            alone, _ = student.get_submodule(p)(hidden_states=u)
            assert rel_err(inside, alone) < 1e-5, p
