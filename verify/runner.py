"""The one stage runner: trains any :class:`~verify.objective.Objective`.

Token budget -> optimizer steps; gradient accumulation to ``tokens_per_step``;
AdamW with a warmup-stable-decay schedule; global-norm clipping; autocast per
``precision``; a guard that stops on a non-finite loss or gradient before the
weights change (the last checkpoint stays good); metrics to ``metrics.jsonl``;
a progress bar with tokens/s. Checkpointing is delegated to a callback so the
caller decides what else goes into the resumable state. Under ``torchrun`` each rank runs this
same loop on its share of the micro-batches; a :class:`~verify.parallel.Strategy` sums the
gradients and metrics over ranks before clipping (see :mod:`verify.parallel`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from surgery.cache import fresh_sequences
from surgery.errors import TrainingError
from surgery.log import progress
from surgery.ops import new_gpu_kernels
from surgery.recipe import Recipe, StageConfig
from surgery.runtime import autocast

from .metrics import MetricsLog
from .objective import Objective
from .parallel import Strategy, is_sharded
from .schedule import wsd_factor


class Batches(Protocol):
    """A resumable stream of ``(batch, seq_len)`` token batches (``surgery.data.BatchStream``)."""

    def next(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class StagePlan:
    """Steps and accumulation implied by a stage's token budget (``accumulation``: micro-batches per
    step over all ranks; ``micro_steps``: this rank's share of them)."""

    steps: int
    accumulation: int
    tokens_per_step: int
    ranks: int = 1

    @classmethod
    def of(cls, cfg: StageConfig, seq_len: int, ranks: int = 1, where: str = "this stage") -> StagePlan:
        per_pass = cfg.micro_batch * seq_len
        plan = cls(steps=cfg.tokens // cfg.tokens_per_step, accumulation=cfg.tokens_per_step // per_pass,
                   tokens_per_step=cfg.tokens_per_step, ranks=ranks)
        if plan.accumulation % ranks:
            raise TrainingError(
                f"{where}: {plan.accumulation} micro-batches per step (tokens_per_step {cfg.tokens_per_step} / (micro_batch "
                f"{cfg.micro_batch} x seq_len {seq_len})) do not split over {ranks} ranks; make tokens_per_step a "
                f"multiple of micro_batch x seq_len x ranks = {per_pass * ranks}"
            )
        return plan

    @property
    def micro_steps(self) -> int:
        return self.accumulation // self.ranks


def check_split(recipe: Recipe, ranks: int) -> None:
    """Every enabled stage's micro-batches per step split evenly over ``ranks`` (else a recipe error)."""
    for s in (1, 2, 3):
        if recipe.stage(s).enabled:
            StagePlan.of(recipe.stage(s), recipe.seq_len(s), ranks=ranks, where=f"stages.stage{s}")


SaveFn = Callable[[int, torch.optim.Optimizer], None]


def build_optimizer(params: list[torch.nn.Parameter], cfg: StageConfig) -> torch.optim.AdamW:
    """AdamW; 1-D tensors (norms, biases, D, A_log) get no weight decay.

    FSDP2's sharded parameters (DTensors) and replicated ones (a tied LM head, kept out of the
    shards) go in separate groups: the multi-tensor AdamW that PyTorch picks on CUDA updates a group
    in one ``_foreach`` call, which refuses to mix DTensors with plain tensors. A run with only one
    kind (every single-process run) has the same two groups as before.

    With ``SURGERY_NEW_GPU_KERNELS=1`` and every parameter a plain CUDA tensor, PyTorch's fused AdamW
    (one kernel per group instead of the multi-tensor path's several per step); opt-in until measured.
    """
    groups = []
    for sharded in (False, True):
        kind = [p for p in params if is_sharded(p) == sharded]
        groups += [{"params": [p for p in kind if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                   {"params": [p for p in kind if p.ndim < 2], "weight_decay": 0.0}]
    fused = new_gpu_kernels() and all(p.is_cuda and not is_sharded(p) for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                             **({"fused": True} if fused else {}))


class StageRunner:
    """Train ``objective`` for one stage's budget."""

    def __init__(
        self,
        stage: int,
        cfg: StageConfig,
        objective: Objective,
        batches: Batches,
        *,
        seq_len: int,
        device: torch.device,
        precision: str,
        log: MetricsLog,
        save: SaveFn,
        parallel: Strategy | None = None,
    ) -> None:
        self.stage, self.cfg, self.objective, self.batches = stage, cfg, objective, batches
        self.device, self.precision, self.log, self.save = device, precision, log, save
        self.parallel = parallel or Strategy.single_process(device)  # distributed: how ranks share the step
        self.plan = StagePlan.of(cfg, seq_len, ranks=self.parallel.world_size)
        self.params = objective.freeze_others()
        if not self.params:
            raise TrainingError(f"stage {stage} has no trainable parameters (did the recipe replace any node?)")
        self.optimizer = build_optimizer(self.params, cfg)

    def lr_at(self, step: int) -> float:
        s = self.cfg.schedule
        return self.cfg.lr * wsd_factor(step, self.plan.steps, s.warmup, s.decay, s.min_lr_ratio)

    def _fail(self, step: int, what: str, value: float) -> TrainingError:
        lower = self.cfg.lr / 4
        return TrainingError(
            f"stage {self.stage} step {step + 1}: {what} is {value}; stopped before updating the weights. "
            f"The last good checkpoint is kept: resume with a lower learning rate, e.g. "
            f"'surgery apply RECIPE stages.stage{self.stage}.lr={lower:g} --resume'"
        )

    def _micro_steps(self, step: int) -> dict[str, torch.Tensor]:
        """Optimizer step ``step``'s worth of forward/backward; averaged metrics, still on the device.

        Objectives return their metrics as tensors (or floats): nothing here waits for the device,
        so micro-steps queue back to back; :meth:`run` reads the values once per optimizer step.
        """
        sums: dict[str, torch.Tensor] = {}
        scale = 1.0 / self.plan.accumulation
        for _ in range(self.plan.micro_steps):  # this rank's share; scale is over all ranks
            batch = self.batches.next().to(self.device, non_blocking=True)
            with autocast(self.precision, self.device), fresh_sequences():  # no host read per mixer call
                metrics = self.objective.train_step(batch, scale)
            for key, value in metrics.items():
                value = torch.as_tensor(value, device=self.device).detach().float() * scale
                sums[key] = sums[key] + value if key in sums else value
        return sums

    def run(self, start_step: int = 0) -> dict[str, Any]:
        """Train from ``start_step`` to the end of the budget; returns a summary."""
        torch_mode = self.objective.student.training
        self.objective.student.eval()  # no dropout: distillation targets are deterministic
        t0, tokens_done = time.perf_counter(), 0
        bar = progress(total=self.plan.steps, initial=start_step, desc=f"stage {self.stage}", unit="step")
        metrics: dict[str, float] = {}
        try:
            for step in range(start_step, self.plan.steps):
                lr = self.lr_at(step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.zero_grad(set_to_none=True)
                sums = self._micro_steps(step)
                sums = self.parallel.reduce(self.params, sums)  # distributed: gradients and metrics summed over ranks
                clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
                grad_norm_t = self.parallel.clip(self.params, clip)
                # the one host read of the step: loss and gradient norm together
                values = torch.stack([sums["loss"], grad_norm_t.to(sums["loss"].device).float()]).tolist()
                if not math.isfinite(values[0]):
                    raise self._fail(step, "the loss", values[0])
                grad_norm = values[1]
                if not math.isfinite(grad_norm):
                    raise self._fail(step, "the gradient norm", grad_norm)
                self.optimizer.step()
                tokens_done += self.plan.tokens_per_step
                rate = tokens_done / max(time.perf_counter() - t0, 1e-9)
                done = step + 1
                metrics = {"loss": values[0]}
                if done % self.cfg.log_every == 0 or done == self.plan.steps:
                    metrics = {key: float(value) for key, value in sums.items()}
                    self.log.write({"stage": self.stage, "step": done, "tokens": done * self.plan.tokens_per_step,
                                    "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate, **metrics})
                if done % self.cfg.checkpoint_every == 0 and done < self.plan.steps:
                    self.save(done, self.optimizer)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", tok_s=f"{rate:.0f}")
        finally:
            bar.close()
            self.objective.student.train(torch_mode)
            for p in self.objective.student.parameters():
                p.requires_grad_(True)
        seconds = time.perf_counter() - t0
        return {"steps": self.plan.steps, "tokens": self.plan.steps * self.plan.tokens_per_step,
                "seconds": seconds, "tokens_per_s": tokens_done / max(seconds, 1e-9),
                "final_loss": metrics.get("loss")}
