"""Stage 3's FSDP2 strategy in this process (a gloo group of one rank): every family trains as unsharded.

The torchrun tests (tests/test_distributed.py) cover two families across processes; this one runs the
sharded copy of every family's student through the real objective and runner, which is where a family
whose causal LM calls a submodule other than the base model (OPT calls ``model.decoder``) or ties its
head would break, and checks the weights against the same steps without FSDP.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from surgery.distributed import Ranks
from surgery.random_models import FAMILIES, random_model
from surgery.recipe import Recipe, StageConfig
from surgery.rewriter import rewrite
from verify.fsdp import FullyShardedStudent
from verify.metrics import DiscardedMetrics
from verify.objective import replaced_nodes
from verify.parallel import Strategy
from verify.runner import StageRunner
from verify.stage3_logits import Distillation

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
CPU = torch.device("cpu")


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[Ranks]:
    """A process group of this process alone, for the length of one test (other tests see none)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield Ranks(rank=0, world_size=1, local_rank=0, device=CPU, launched=True)
    finally:
        dist.destroy_process_group()


class Batches:
    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(0)

    def next(self) -> torch.Tensor:
        return torch.randint(3, 300, (2, 32), generator=self.gen)


def train(student: torch.nn.Module, teacher: torch.nn.Module, parallel: Strategy, precision: str) -> torch.nn.Module:
    cfg = StageConfig(tokens=192, tokens_per_step=64, micro_batch=2, seq_len=32, lr=1e-2, checkpoint_every=1000)
    trained = parallel.prepare(student)
    objective = Distillation(teacher, trained, replaced_nodes(trained))
    runner = StageRunner(3, cfg, objective, Batches(), seq_len=32, device=CPU, precision=precision,
                         log=DiscardedMetrics(), save=lambda step, opt: None, parallel=parallel)
    runner.run()
    parallel.finish(student)
    return student


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module.*returned a view tensor")  # GPT-2, OPT; results equal
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sharded_stage3_equals_unsharded(one_rank_group: Ranks, family: str, precision: str) -> None:
    """bf16 (autocast) with one micro-batch per step: the case the H200 found (see :func:`surgery.runtime.autocast`)."""
    teacher = random_model(family)
    student, _ = rewrite(teacher, Recipe.load(TINY).replace)
    plain = train(copy.deepcopy(student), teacher, Strategy(one_rank_group), precision)
    sharded = train(student, teacher, FullyShardedStudent(one_rank_group, Recipe.load(TINY).distributed), precision)
    expected, got = plain.state_dict(), sharded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), family
    assert any(not torch.equal(expected[k], teacher.state_dict().get(k, expected[k])) for k in expected)  # it trained
