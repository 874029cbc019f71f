"""Acceptance: ``surgery apply`` writes a student that a fresh process loads with identical logits.

The apply runs in this process (``surgery.pipeline.Run``: setup, train, save); right after the save
the in-memory trained student -- the object that was written -- scores fixed token ids, and those
logits go to a safetensors file. A separate Python process, which never saw the run, then calls
``surgery.load`` on each directory (network disabled, ``torch.load`` and the teacher module
poisoned) and writes its own logits and greedy generations; they must be bit-identical
(``torch.equal``). One intra-op thread in both processes keeps CPU kernels deterministic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.options import ApplyOptions
from surgery.pipeline import Run
from surgery.recipe import Recipe

pytestmark = pytest.mark.hf_contract  # also run on the oldest supported and the newest transformers (.ci/run)

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["llama", "phi", "gpt2"]
FAST = ["stages.stage1.tokens=256", "stages.stage2.tokens=256", "stages.stage3.tokens=256", "verify.tokens=128",
        "data.seq_len=32"]
IDS = torch.randint(4, 260, (2, 24), generator=torch.Generator().manual_seed(1234))  # (b, L) byte-token ids
NEW = 8

FRESH = textwrap.dedent(
    """
    import json, socket, sys
    import torch
    torch.set_num_threads(1)

    def refuse(*args, **kwargs):
        raise AssertionError("no network and no pickle while loading a student")

    socket.socket.connect = refuse
    torch.load = refuse
    import surgery
    from safetensors.torch import load_file, save_file
    from surgery.cache import SurgeryCache
    from surgery.hf_conventions import output_cache

    dirs, ids_path, out_path, NEW = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    ids = load_file(ids_path)["ids"]
    out = {}
    for name, d in dirs.items():
        model = surgery.load(d)
        assert not model.training
        with torch.no_grad():
            out[name + ".logits"] = model(ids, use_cache=False).logits
            gen = model.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        assert isinstance(output_cache(gen), SurgeryCache), type(output_cache(gen))
        out[name + ".generated"] = gen.sequences
    assert "surgery.teacher" not in sys.modules, "loading a student must not touch teacher code"
    save_file(out, out_path)
    """
)


def apply_in_process(family: str, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    recipe = Recipe.load(ROOT / "recipes" / "tiny.yaml", [f"teacher.model=random:{family}", *FAST])
    run = Run(recipe, ApplyOptions(out=str(out)))
    run.setup()
    run.train()
    assert run.save() == out
    student = run.student.eval()
    student.generation_config.eos_token_id = None  # fixed-length generations in both processes
    with torch.no_grad():
        logits = student(IDS, use_cache=False).logits
        generated = student.generate(IDS, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    return logits, generated


def test_apply_then_fresh_process_load_is_identical(tmp_path: Path) -> None:
    expected, dirs = {}, {}
    for family in FAMILIES:
        out = tmp_path / f"tiny-{family}"
        expected[family + ".logits"], expected[family + ".generated"] = apply_in_process(family, out)
        dirs[family] = str(out)
        # the generation config on disk must not stop early either
        gen_cfg = json.loads((out / "generation_config.json").read_text())
        gen_cfg["eos_token_id"] = None
        (out / "generation_config.json").write_text(json.dumps(gen_cfg))
    save_file({"ids": IDS}, str(tmp_path / "ids.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(dirs), str(tmp_path / "ids.safetensors"),
                           str(tmp_path / "got.safetensors"), str(NEW)], capture_output=True, check=False, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "got.safetensors"))
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    for family in FAMILIES:
        assert got[family + ".generated"].shape == (2, IDS.shape[1] + NEW)


@pytest.mark.parametrize("family", ["llama"])
def test_apply_output_directory(tmp_path: Path, family: str) -> None:
    out = tmp_path / "tiny"
    apply_in_process(family, out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.resolved.yaml", "provenance.json",
            "report.json", "report.md", "README.md", "metrics.jsonl"} <= names
    prov = json.loads((out / "provenance.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert prov["seed"] == 0 and prov["tokens"]["stage1"] == 256 and prov["tokens"]["total"] == 768
    assert prov["teacher"]["ref"] == f"random:{family}"
    card = (out / "README.md").read_text()
    assert "## Distillation stages" in card and "| 1 matrix orientation | yes | 256 |" in card
    assert f"{report['perplexity']['student_final']:.4g}" in card
    assert 'surgery.load("' in card and "surgery generate" in card
    section = json.loads((out / "config.json").read_text())["surgery"]
    assert section["teacher"] == f"random:{family}" and section["rules"][0]["mixer"] == "discrete_mamba2"
    assert (Recipe.load(out / "recipe.resolved.yaml").teacher.model) == f"random:{family}"
