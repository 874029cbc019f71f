"""``torchrun`` on the CPU (gloo): 2 processes reach the single-process weights; kill -9 + ``--resume``; errors name the rank.

Every run is ``recipes/tiny.yaml`` with 2, 2 and 4 optimizer steps in stages 1, 2, 3 (2 micro-batches
a step: one per rank), a checkpoint every 2 steps, stage 3 under FSDP2. Tolerance for "the same weights as one
process": max |difference| <= 1e-6 over every tensor (measured: 0, bitwise, for llama and gpt2 with
the recipe's clipping; ~6e-8 when clipping is active every step, e.g. grad_clip=0.01).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import surgery
from surgery.pipeline import apply
from surgery.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
FAST = ["stages.stage1.tokens=512", "stages.stage2.tokens=512", "stages.stage3.tokens=1024", "verify.tokens=128"]
TOLERANCE = 1e-6

KILL_RANK1 = """
import os, signal, sys
import verify.runner as runner
original = runner.StageRunner._micro_steps
def killing(self, step):
    if self.stage == 3 and step == 2 and os.environ["RANK"] == "1":  # after the checkpoint at step 2
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, step)
runner.StageRunner._micro_steps = killing
from surgery.cli import main
sys.exit(main(sys.argv[1:]))
"""

FAIL_ON_RANK1 = """
import os, sys
import verify.stage1_matrix as stage1
from surgery.errors import DataError
original = stage1.MatrixOrientation.train_step
def failing(self, input_ids, scale):
    if os.environ["RANK"] == "1":
        raise DataError("injected: a shard could not be read")
    return original(self, input_ids, scale)
stage1.MatrixOrientation.train_step = failing
from surgery.cli import main
sys.exit(main(sys.argv[1:]))
"""

def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(args: list[str], script: str | None = None, tmp_path: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2`` of ``surgery ARGS`` (or of ``script`` with ARGS)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--monitor-interval=0.1"]
    if script is not None:
        assert tmp_path is not None
        path = tmp_path / "entry.py"
        path.write_text(script)
        cmd.append(str(path))
    else:
        cmd += ["-m", "surgery"]
    return subprocess.run(cmd + args, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)


def max_difference(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def single_process(tmp_path: Path, *overrides: str) -> Path:
    return apply(Recipe.load(TINY, [f"output.dir={tmp_path / 'single'}", *overrides]))


def assert_same_format(single: Path, distributed: Path) -> None:
    """The same files, config and tensors; the distributed student loads on one device and computes the same logits."""
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in distributed.iterdir())
    assert json.loads((single / "config.json").read_text()) == json.loads((distributed / "config.json").read_text())
    ids = torch.arange(3, 35).view(1, 32)
    with torch.no_grad():
        a = surgery.load(str(single))(input_ids=ids).logits
        b = surgery.load(str(distributed))(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def logged_steps(out: Path, stage: int) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["stage"] == stage]


def test_two_ranks_equal_one_and_kill_9_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """llama: 2 ranks == 1 process; rank 1 killed mid-stage 3, ``--resume`` == the uninterrupted 2-rank run."""
    common = ["-q", "apply", str(TINY), *FAST]
    straight = torchrun([*common, "--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr
    assert straight.stdout.count("student written to") == 1  # rank 0 alone reports
    single = single_process(tmp_path, *FAST)
    assert max_difference(single, tmp_path / "straight") <= TOLERANCE
    assert_same_format(single, tmp_path / "straight")
    assert logged_steps(tmp_path / "straight", 3) == [1, 2, 3, 4]  # rank 0 alone logs

    killed = torchrun([*common, "--out", str(tmp_path / "resumed")], script=KILL_RANK1, tmp_path=tmp_path)
    assert killed.returncode != 0
    assert re.search(r"rank\s*: 1 .*\n\s*exitcode\s*: -9", killed.stderr)  # torchrun names the killed rank
    state = json.loads((tmp_path / "resumed.partial" / "checkpoint" / "state.json").read_text())
    assert (state["stage"], state["step"], state["completed"]) == (3, 2, [1, 2])
    assert not (tmp_path / "resumed").exists()

    resumed = torchrun([*common, "--out", str(tmp_path / "resumed"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_steps(tmp_path / "resumed", 3) == [1, 2, 3, 4]  # no step logged twice


def test_nproc_2_equals_one_process_with_tied_embeddings(tmp_path: Path) -> None:
    """gpt2 (tied input/output embeddings, fused Conv1D attention) through ``surgery apply --nproc 2``."""
    overrides = ["teacher.model=random:gpt2", *FAST]
    cmd = [sys.executable, "-m", "surgery", "-q", "apply", str(TINY), *overrides, "--out", str(tmp_path / "two"),
           "--nproc", "2"]
    two = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr
    single = single_process(tmp_path, *overrides)
    assert max_difference(single, tmp_path / "two") <= TOLERANCE
    assert_same_format(single, tmp_path / "two")


def test_an_error_on_rank_1_stops_both_ranks_and_names_the_rank(tmp_path: Path) -> None:
    run = torchrun(["-q", "apply", str(TINY), "verify.tokens=128", "--out", str(tmp_path / "out")],
                   script=FAIL_ON_RANK1, tmp_path=tmp_path)
    assert run.returncode != 0  # and it returned: rank 0, waiting in a collective, was stopped too
    assert "error: rank 1 of 2: injected: a shard could not be read" in run.stderr
    assert not (tmp_path / "out").exists()
    state = json.loads((tmp_path / "out.partial" / "checkpoint" / "state.json").read_text())
    assert state["stage"] is None and state["completed"] == []  # the transfer checkpoint is what is kept


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["--nproc", "3"], "stages.stage1: 2 micro-batches per step (tokens_per_step 256 / (micro_batch 2 x seq_len 64)) "
                           "do not split over 3 ranks; make tokens_per_step a multiple of micro_batch x seq_len x ranks = 384"),
        (["--nproc=0"], "--nproc 0: give the number of processes, at least 1"),
    ],
)
def test_nproc_refuses_before_launching(tmp_path: Path, words: list[str], message: str,
                                        capsys: pytest.CaptureFixture) -> None:
    from surgery.cli import main

    code = main(["-q", "apply", str(TINY), "--out", str(tmp_path / "out"), *words])
    assert code == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written, nothing launched


FOREACH_WITH_TIED_HEAD = """
import torch
from surgery.distributed import init_ranks
from surgery.random_models import random_model
from surgery.recipe import DistributedConfig, Stage3Config
from verify.fsdp import FullyShardedStudent
from verify.parallel import is_sharded
from verify.runner import build_optimizer

ranks = init_ranks("cpu")
student = random_model("llama", seed=0, tie_word_embeddings=True)
sharded = FullyShardedStudent(ranks, DistributedConfig()).prepare(student)
params = list(sharded.parameters())
kinds = {is_sharded(p) for p in params}
assert kinds == {True, False}, kinds  # sharded layers and the replicated tied head
ids = torch.randint(3, 100, (2, 16))


def step(optimizer):
    optimizer.zero_grad()
    sharded(input_ids=ids).logits.float().pow(2).mean().backward()
    optimizer.step()


naive = torch.optim.AdamW(params, lr=1e-3, foreach=True)  # what CUDA picks by default: one _foreach per group
try:
    step(naive)
    raise SystemExit("one mixed group did not fail: the check below proves nothing")
except RuntimeError as e:
    assert "DTensor" in str(e), e
ours = build_optimizer(params, Stage3Config(weight_decay=0.1))
for group in ours.param_groups:
    group["foreach"] = True
step(ours)
print("FOREACH_OK", len(ours.param_groups))
"""


def test_multi_tensor_adamw_steps_fsdp2_shards_beside_a_tied_head(tmp_path: Path) -> None:
    """CUDA's default AdamW (foreach) with a sharded student whose tied head stays replicated (SmolLM2).

    Found on the H200 with ``torchrun --nproc-per-node 1``: one parameter group mixing DTensors
    and the replicated head fails in ``_foreach_lerp_``; CPU picks the per-tensor AdamW, so the
    gloo runs never met it. Here foreach is forced on CPU.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "--monitor-interval=0.1"]
    script = tmp_path / "entry.py"
    script.write_text(FOREACH_WITH_TIED_HEAD)
    done = subprocess.run([*cmd, str(script)], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "FOREACH_OK 3" in done.stdout  # the replicated head; the sharded decay and no-decay groups
