"""The stage runner's machinery: WSD schedule, checkpoints without pickle, the non-finite guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery.errors import TrainingError
from surgery.recipe import StageConfig
from verify.checkpoint import load_optimizer, load_student, read_state, save_checkpoint
from verify.metrics import MetricsLog
from verify.objective import Objective
from verify.runner import StageRunner, build_optimizer
from verify.schedule import wsd_factor


def test_wsd_warms_up_holds_and_decays() -> None:
    total = 20
    f = [wsd_factor(s, total, warmup=0.2, decay=0.3, min_ratio=0.1) for s in range(total)]
    assert f[0] < f[1] < f[2] < f[3] < 1.0  # 4 warmup steps
    assert f[4:14] == [1.0] * 10  # stable
    assert all(a > b for a, b in zip(f[14:], f[15:]))  # decaying
    assert f[-1] == pytest.approx(0.1)


def test_wsd_without_warmup_or_decay_is_constant() -> None:
    assert [wsd_factor(s, 5, 0.0, 0.0) for s in range(5)] == [1.0] * 5


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(4, 1)


class ToyObjective(Objective):
    """Regress b(a(x)) onto sum(x); trains everything."""

    stage = 2

    def __init__(self, model: Toy, poison_at: int | None = None) -> None:
        super().__init__(teacher=model, student=model, nodes=[])
        self.calls = 0
        self.poison_at = poison_at

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.student.named_parameters())

    def train_step(self, input_ids: torch.Tensor, scale: float) -> dict[str, float]:
        x = input_ids.float()
        loss = ((self.student.b(self.student.a(x)).squeeze(-1) - x.sum(-1)) ** 2).mean()
        self.calls += 1
        if self.poison_at is not None and self.calls >= self.poison_at:
            loss = loss * float("nan")
        (loss * scale).backward()
        return {"loss": loss.item()}


class Stream:
    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.served = 0

    def next(self) -> torch.Tensor:
        self.served += 1
        return torch.randint(0, 5, (2, 8), generator=self.gen)


def runner_for(model: Toy, tmp_path: Path, poison_at: int | None = None, saves: list | None = None) -> StageRunner:
    cfg = StageConfig(tokens=128, tokens_per_step=32, micro_batch=2, seq_len=8, lr=1e-2, checkpoint_every=1)
    saved = saves if saves is not None else []
    return StageRunner(
        2, cfg, ToyObjective(model, poison_at), Stream(), seq_len=8, device=torch.device("cpu"), precision="fp32",
        log=MetricsLog(tmp_path / "metrics.jsonl"),
        save=lambda step, opt: (saved.append(step), save_checkpoint(tmp_path / "ckpt", model, {"step": step}, opt)),
    )


def test_runner_trains_logs_and_checkpoints(tmp_path: Path) -> None:
    model = Toy()
    saves: list[int] = []
    runner = runner_for(model, tmp_path, saves=saves)
    assert runner.plan.steps == 4 and runner.plan.accumulation == 2
    summary = runner.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < records[0]["loss"]
    assert saves == [1, 2, 3]  # the last step is saved by the caller at the stage boundary
    assert summary["tokens"] == 128


def test_non_finite_loss_stops_before_update_and_keeps_checkpoint(tmp_path: Path) -> None:
    model = Toy()
    runner = runner_for(model, tmp_path, poison_at=5)  # the third step's first micro-batch
    with pytest.raises(TrainingError, match=r"stage 2 step 3: the loss is nan.*last good checkpoint.*--resume"):
        runner.run()
    assert read_state(tmp_path / "ckpt")["step"] == 2
    fresh = Toy()
    load_student(tmp_path / "ckpt", fresh)
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never updated weights


def test_checkpoint_round_trip_restores_optimizer_exactly(tmp_path: Path) -> None:
    model = Toy()
    cfg = StageConfig(tokens=128, tokens_per_step=32, micro_batch=2, seq_len=8, weight_decay=0.1)
    opt = build_optimizer(list(model.parameters()), cfg)
    for _ in range(3):
        opt.zero_grad()
        model.b(model.a(torch.randn(3, 8))).pow(2).mean().backward()
        opt.step()
    save_checkpoint(tmp_path / "ck", model, {"stage": 2, "step": 3}, opt)
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in (tmp_path / "ck").iterdir())
    other = Toy()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    opt2 = build_optimizer(list(other.parameters()), cfg)
    load_student(tmp_path / "ck", other)
    assert load_optimizer(tmp_path / "ck", opt2)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, value in s1["state"][k].items():
            assert torch.equal(value, s2["state"][k][name])


def test_checkpoint_for_another_model_is_a_clear_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ck", Toy(), {"step": 0})
    with pytest.raises(TrainingError, match="does not fit this student"):
        load_student(tmp_path / "ck", nn.Linear(2, 2))


def test_runner_trains_inside_fresh_sequences(tmp_path: Path) -> None:
    """Micro-steps run inside surgery.cache.fresh_sequences (mixers skip their per-layer host read), and only they do."""
    import surgery.cache as cache

    model = Toy()
    runner = runner_for(model, tmp_path)
    seen: list[int] = []
    step = runner.objective.train_step
    runner.objective.train_step = lambda ids, scale: (seen.append(cache._FRESH_SEQUENCES), step(ids, scale))[1]
    runner.run()
    assert seen and all(v == 1 for v in seen)
    assert cache._FRESH_SEQUENCES == 0


def test_fused_adamw_only_for_cuda_parameters_under_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    params = list(Toy().parameters())
    monkeypatch.setenv("SURGERY_NEW_GPU_KERNELS", "1")
    assert not build_optimizer(params, StageConfig()).defaults.get("fused")  # CPU tensors: the multi-tensor path
    monkeypatch.setenv("SURGERY_NEW_GPU_KERNELS", "0")
    assert not build_optimizer(params, StageConfig()).defaults.get("fused")
