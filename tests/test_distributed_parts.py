"""The distributed pieces in one process: rank shards of the stream, the step split, gradient buckets, rank names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.data import BatchStream, RankShard
from surgery.distributed import Ranks, init_ranks, rank_device
from surgery.errors import RecipeError, SurgeryError, TrainingError
from surgery.launch import torchrun_command, without_nproc
from surgery.recipe import Recipe
from verify.fsdp import shard_like
from verify.parallel import DataParallel, Strategy, _buckets, strategy_for
from verify.runner import StagePlan, check_split

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def stream(batch_size: int = 3) -> BatchStream:
    return BatchStream(torch.arange(1000), seq_len=10, batch_size=batch_size, seed=7)  # 100 chunks


def test_skip_moves_the_cursor_as_reading_does() -> None:
    read, skipped = stream(), stream()
    for _ in range(40):  # several epochs of 100 chunks in batches of 3
        read.next()
    skipped.skip(40)
    assert skipped.state_dict() == read.state_dict()
    assert torch.equal(skipped.next(), read.next())


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_disjoint_and_together_the_single_stream(world: int) -> None:
    reference = stream()
    single = [reference.next() for _ in range(12 * world)]
    shards = [RankShard(stream(), rank, world) for rank in range(world)]
    per_rank = [[shard.next() for _ in range(12)] for shard in shards]
    for i, batch in enumerate(single):  # micro-batch i of the one stream is rank i % N's (i // N)-th
        assert torch.equal(per_rank[i % world][i // world], batch)
    assert all(s.state_dict() == reference.state_dict() for s in shards)  # the cursor is the global one
    assert shards[0].tokens_served == 12 * world * 3 * 10


def test_a_restored_shard_continues_on_exactly_the_next_batches() -> None:
    reference = stream()
    for _ in range(10):
        reference.next()
    state = reference.state_dict()  # after 10 micro-batches: a step boundary for 2 ranks
    expected = [reference.next() for _ in range(6)]
    restored = [RankShard(stream(), rank, 2) for rank in range(2)]
    for shard in restored:
        shard.load_state_dict(state)
    got = [restored[i % 2].next() for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_step_split_over_ranks() -> None:
    recipe = Recipe.load(TINY)  # 2 micro-batches of 2 x 64 tokens per step
    plan = StagePlan.of(recipe.stage(1), recipe.seq_len(1), ranks=2)
    assert (plan.accumulation, plan.micro_steps) == (2, 1)
    check_split(recipe, 1)
    check_split(recipe, 2)
    with pytest.raises(TrainingError, match=r"stages\.stage1: 2 micro-batches per step .* do not split over 4 ranks; "
                                            r"make tokens_per_step a multiple of micro_batch x seq_len x ranks = 512"):
        check_split(recipe, 4)
    check_split(Recipe.load(TINY, ["stages.stage1.enabled=false", "stages.stage2.enabled=false",
                                   "stages.stage3.tokens_per_step=512", "stages.stage3.tokens=2048"]), 4)


def test_distributed_section_is_validated() -> None:
    recipe = Recipe.load(TINY, ["distributed.fsdp_param_dtype=bfloat16"])
    assert recipe.distributed.fsdp_param_dtype == "bfloat16" and recipe.distributed.fsdp_reduce_dtype == "float32"
    with pytest.raises(RecipeError, match=r"distributed\.fsdp_param_dtype"):
        Recipe.load(TINY, ["distributed.fsdp_param_dtype=float8"])
    with pytest.raises(RecipeError, match=r"distributed has no field .fsdp_shard_teacher."):
        Recipe.load(TINY, ["distributed.fsdp_shard_teacher=true"])


def test_buckets_group_by_dtype_and_size() -> None:
    ts = [torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(8), torch.zeros(2)]
    sizes = [[t.numel() for t in b] for b in _buckets(ts, max_bytes=32)]
    assert sizes == [[4, 4], [4], [8], [2]]  # 32 bytes: two float32 x4; a dtype change starts a bucket
    assert [len(b) for b in _buckets([torch.zeros(100)], max_bytes=8)] == [1]  # a big tensor is its own bucket


def test_one_process_strategy_changes_nothing() -> None:
    ranks = Ranks.single(torch.device("cpu"))
    assert not ranks.launched and ranks.is_main and ranks.world_size == 1
    parallel = strategy_for(3, ranks, Recipe.load(TINY).distributed)
    assert type(parallel) is Strategy  # no FSDP without torchrun
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    loss = torch.tensor(1.5)
    assert parallel.reduce([p], {"loss": loss}) == {"loss": loss}
    assert float(parallel.clip([p], max_norm=1.0)) == pytest.approx(12**0.5)
    assert torch.allclose(p.grad.norm(), torch.tensor(1.0))
    assert DataParallel(ranks).reduce([p], {"loss": loss}) == {"loss": loss}
    value = torch.randn(3)
    assert shard_like(value, p) is value  # only sharded (DTensor) parameters are cut


def test_not_under_torchrun_means_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    ranks = init_ranks("cpu")
    assert ranks == Ranks.single(torch.device("cpu"))


def test_one_gpu_per_rank() -> None:
    with pytest.raises(SurgeryError, match=r"device='cuda:1' names one GPU, but under torchrun each rank uses "
                                           r"cuda:LOCAL_RANK; set device=cuda"):
        rank_device("cuda:1", 0)
    assert rank_device("cpu", 3) == torch.device("cpu")


def test_errors_name_the_rank(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from surgery.cli import main
    from surgery.log import configure

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        assert main(["apply", str(TINY), "stages.stage1.tokenz=3"]) == 2
    finally:
        monkeypatch.undo()
        configure()  # the next test gets rank 0's console again
    assert "error: rank 1 of 2: " in capsys.readouterr().err


def test_nproc_becomes_a_torchrun_command() -> None:
    argv = ["-q", "apply", "r.yaml", "--nproc", "4", "x=1", "--nproc=4", "--resume"]
    assert without_nproc(argv) == ["-q", "apply", "r.yaml", "x=1", "--resume"]
    cmd = torchrun_command(argv, 4)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m"]
    assert cmd[6:] == ["surgery", "-q", "apply", "r.yaml", "x=1", "--resume"]


HUB_RECIPES = sorted(p for p in TINY.parent.glob("*.yaml")
                     if not Recipe.load(p).teacher.model.startswith(("builtin:", "random:")))


@pytest.mark.parametrize("path", HUB_RECIPES, ids=lambda p: p.name)
def test_every_hub_recipe_splits_over_8_gpus(path: Path) -> None:
    check_split(Recipe.load(path), 8)


def test_the_8b_recipe_plans_on_llama_3_1_8b() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from surgery.rewriter import plan

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=False)  # the published config's sizes
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
    result = plan(teacher, Recipe.load(TINY.parent / "llamba_8b_8gpu.yaml").replace)
    assert len(result.entries) == 32
    assert all(e.params["n_qk_heads"] == 32 and e.params["n_b_heads"] == 8 and e.params["head_dim"] == 128
               for e in result.entries)
    summary = result.to_dict()["summary"]
    assert (summary["params_before"], summary["params_after"]) == (8_030_261_248, 8_639_632_384)  # docs/design.md
