"""``surgery apply``: the whole job as one run (setup, measure, train the stages, save).

Everything that can fail on bad input (recipe, output path, teacher, selection,
data, a budget that would repeat the data too often) runs before anything is
written. Work in progress lives beside the output in ``<out>.partial/``
(checkpoint, metrics.jsonl), which one run at a time holds locked
(:mod:`surgery.run_lock`); the student directory appears in one rename at the end,
and what a killed run left half-written is tidied by the next. ``resume=True``
continues from the last checkpoint, mid-stage on the same data cursor, and
reaches the same weights as an uninterrupted run (CPU, same seed). A full disk
stops the run with a message saying whether ``--resume`` can continue it.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from verify.checkpoint import load_optimizer, load_student, read_state, save_checkpoint
from verify.compiled import check_compile, stage_compiled
from verify.measure import Measurement, measure
from verify.metrics import DiscardedMetrics, MetricsLog
from verify.objective import Node, Objective, replaced_nodes
from verify.parallel import Strategy, strategy_for
from verify.plots import before_after_series, plot_losses, plot_per_layer
from verify.report import build_report, report_markdown
from verify.runner import StageRunner, check_split
from verify.stage1_matrix import MatrixOrientation
from verify.stage2_hidden import HiddenStateAlignment
from verify.stage3_logits import Distillation

from .distributed import Ranks, init_ranks
from .errors import SurgeryError, TrainingError
from .io import is_disk_full, tidy_atomic_leftovers
from .log import logger, quiet
from .options import ApplyOptions
from .output_dir import check_output_dir, output_name_problem
from .phase_clock import PhaseClock
from .recipe import Recipe
from .run_lock import clear_work_dir, hold_work_dir
from .runtime import autocast_dtype, seed_everything


def recipe_fingerprint(recipe: Recipe) -> str:
    """Hash of everything that determines the result (not where it is written)."""
    data = recipe.model_dump(mode="json")
    data.pop("output", None)
    return hashlib.sha256(repr(sorted(data.items())).encode()).hexdigest()[:16]


def make_objective(stage: int, recipe: Recipe, teacher: torch.nn.Module, student: torch.nn.Module,
                   nodes: list[Node]) -> Objective:
    """The objective a stage trains."""
    if stage == 1:
        return MatrixOrientation(teacher, student, nodes)
    if stage == 2:
        return HiddenStateAlignment(teacher, student, nodes, target=recipe.stages.stage2.target)
    cfg = recipe.stages.stage3
    return Distillation(teacher, student, nodes, temperature=cfg.temperature, kl_weight=cfg.kl_weight,
                        ce_weight=cfg.ce_weight, train=cfg.train)


def _dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    if recipe.teacher.dtype != "auto":
        return getattr(torch, recipe.teacher.dtype)
    return torch.float32  # master weights stay float32; bf16 comes from autocast


class Run:
    """One ``surgery apply`` run."""

    def __init__(self, recipe: Recipe, options: ApplyOptions | None = None) -> None:
        self.recipe = recipe
        self.opts = options or ApplyOptions()
        out = self.opts.out if self.opts.out is not None else recipe.output.dir
        problem = output_name_problem(out)
        if problem:
            raise SurgeryError(f"{'--out' if self.opts.out is not None else 'output.dir'}: {problem}")
        self.out = Path(out)
        self.work = self.out.with_name(self.out.name + ".partial")
        self.ckpt = self.work / "checkpoint"
        self.overwrite = self.opts.overwrite or recipe.output.overwrite
        self.fingerprint = recipe_fingerprint(recipe)
        self.ranks: Ranks | None = None  # distributed: set by setup (or by apply, before the run lock)
        self.clock = PhaseClock()  # wall seconds per phase, for the report

    # ------------------------------------------------------------------ setup (writes nothing)

    def check_output(self) -> None:
        """The flags and the output path (nothing read from the work directory, which another run may hold)."""
        if self.opts.resume and self.opts.restart:
            raise SurgeryError("--resume and --restart exclude each other")
        check_output_dir(self.out)
        if self.out.exists() and not self.overwrite:
            raise SurgeryError(f"output directory {self.out} already exists; pass --overwrite or choose --out DIR")

    def check_paths(self) -> None:
        """:meth:`check_output`, then whether the work directory holds a run to resume."""
        self.check_output()
        if (self.ckpt / "state.json").is_file() and not (self.opts.resume or self.opts.restart):
            raise SurgeryError(
                f"an interrupted run is in {self.work}; pass --resume to continue it or --restart to discard it"
            )
        if self.opts.resume and not (self.ckpt / "state.json").is_file():
            raise SurgeryError(f"nothing to resume: no checkpoint in {self.work}; run without --resume")

    def setup(self) -> None:
        from .data import Corpus, check_repeats, heldout_batches
        from .rewriter import rewrite
        from .student.prebuild import check_rebuildable
        from .teacher import load_teacher

        self.check_paths()
        r = self.recipe
        # --- distributed: this process's rank (one process unless launched by torchrun) ---
        if self.ranks is None:
            self.ranks = init_ranks(r.device)
        self.device = self.ranks.device
        check_split(r, self.ranks.world_size)  # every rank's share of a step is whole
        check_compile(r, self.ranks.world_size, self.device)  # before the teacher loads
        # ---
        seed_everything(r.seed)
        with self.ranks.main_first():  # distributed: rank 0 fills the teacher and data caches first
            with self.clock("teacher"):
                self.teacher = load_teacher(r.teacher, device=self.device, dtype=_dtype(r, self.device),
                                            progress=not quiet())
            rules = self._resolve_layers()
            with self.clock("rewrite"):
                self.student, self.plan = rewrite(self.teacher.model, rules)
                check_rebuildable(self.student, self.plan, self.out)  # what surgery.load needs, before any training
            self.nodes = replaced_nodes(self.student)
            sampler = self._sampler()
            t0 = time.perf_counter()
            self.corpus = Corpus.for_recipe(r, self.teacher.tokenizer, progress=not quiet(), sampler=sampler)
            sampled = sampler.seconds if sampler is not None else 0.0  # generation, inside the data build
            self.clock.add("data", time.perf_counter() - t0 - sampled)
            if sampled:
                self.clock.add("teacher_samples", sampled)
        self.ranks.broadcast_module(self.student)  # distributed: replicas start from rank 0's weights
        self.heldout = heldout_batches(self.corpus, seq_len=r.verify.seq_len or r.data.seq_len,
                                       batch_size=r.verify.micro_batch, tokens=r.verify.tokens)
        s1_tokens = r.verify.stage1_tokens or r.verify.micro_batch * (r.verify.seq_len or r.data.seq_len)
        self.stage1_batches = max(1, s1_tokens // (r.verify.micro_batch * (r.verify.seq_len or r.data.seq_len)))
        if r.stage(1).enabled and self.nodes:
            MatrixOrientation(self.teacher.model, self.student, self.nodes)  # head-count check, before writing
        check_repeats(r, self.corpus.train.numel(), estimate=self._estimate)

    def _resolve_layers(self) -> list:
        """The replace rules with ``layers: auto`` made explicit; the run's recipe records the choice."""
        from .layer_choice import has_auto, ranking_batches, resolve_auto_layers

        self.layer_choice = None
        if not has_auto(self.recipe.replace):
            return self.recipe.replace
        with self.clock("layer_choice"):
            batches = ranking_batches(self.recipe, self.teacher.tokenizer)
            rules, self.layer_choice = resolve_auto_layers(self.recipe.replace, self.teacher.model, batches)
        logger.info(self.layer_choice.to_text())
        self.recipe = self.recipe.model_copy(update={"replace": rules})  # recipe.resolved.yaml lists the layers
        return rules

    def _estimate(self) -> str:
        from .run_estimate import estimate_training_seconds, human_duration

        seconds = estimate_training_seconds(self.recipe, self.teacher.model, self.student, self.corpus.train,
                                            self.device)
        return f"{human_duration(seconds)} or more on {self.device} (estimated from timed teacher forward passes)"

    def _sampler(self) -> Any:
        """The teacher as a sampler, where a data source samples from it (``builtin:teacher-samples``)."""
        if not any(s.source == "builtin:teacher-samples" for s in self.recipe.data.sources):
            return None
        from .data.teacher_samples import TeacherSampler

        return TeacherSampler(self.teacher.model, self.teacher.tokenizer, self.teacher.provenance())

    # ------------------------------------------------------------------ state

    def _measure(self, name: str) -> Measurement:
        with self.clock("evaluations"):
            return measure(self.teacher.model, self.student, self.nodes, self.heldout, stage1_batches=self.stage1_batches,
                           device=self.device, precision=self.recipe.precision, desc=f"measure {name}")

    def _save(self, *, stage: int | None, step: int = 0, stream: dict | None = None,
              optimizer: torch.optim.Optimizer | None = None, parallel: Strategy | None = None) -> None:
        state = {"fingerprint": self.fingerprint, "completed": self.completed, "stage": stage, "step": step,
                 "stream": stream, "trail": [(n, m.to_dict()) for n, m in self.trail], "stages": self.stage_info}
        # distributed: full weights gathered for rank 0, which alone writes; every rank leaves once it is on disk
        with (parallel or Strategy(self.ranks)).checkpoint_view(self.student, optimizer) as (student, opt_state):
            if self.ranks.is_main:
                save_checkpoint(self.ckpt, student, state, opt_state)
        self.ranks.barrier()

    def _restore(self) -> dict[str, Any]:
        state = read_state(self.ckpt)
        if state["fingerprint"] != self.fingerprint:
            raise SurgeryError(
                f"the recipe changed since the interrupted run in {self.work}; resume with the same recipe and "
                "overrides, or pass --restart to discard it"
            )
        load_student(self.ckpt, self.student)
        self.completed = list(state["completed"])
        self.trail = [(n, Measurement(**m)) for n, m in state["trail"]]
        self.stage_info = {int(k): v for k, v in state["stages"].items()}
        return state

    # ------------------------------------------------------------------ the job

    def train(self) -> None:
        from .data import BatchStream, RankShard

        r = self.recipe
        self.ranks.barrier()  # distributed: every rank has checked the paths before rank 0 writes
        if self.ranks.is_main:
            if not self.opts.resume:  # a fresh start: what a run killed before its first checkpoint left goes
                clear_work_dir(self.work)
            self.work.mkdir(parents=True, exist_ok=True)
            self.log = MetricsLog(self.work / "metrics.jsonl", tensorboard_dir=self.work / "tensorboard")
        else:
            self.log = DiscardedMetrics()
        self.completed: list[int] = []
        self.trail: list[tuple[str, Measurement]] = []
        self.stage_info: dict[int, dict[str, Any]] = {
            s: {"enabled": r.stage(s).enabled, "tokens": r.stage(s).tokens if r.stage(s).enabled else 0}
            for s in (1, 2, 3)
        }
        state: dict[str, Any] = {"stage": None}
        if self.opts.resume:
            state = self._restore()
            if state["stage"]:  # mid-stage: steps after the checkpoint are logged again
                self.log.truncate_after(state["stage"], state["step"])
            else:  # at a stage boundary: a stage that had not checkpointed starts over
                self.log.truncate_after(max(self.completed, default=0), 2**62)
            logger.info(f"resuming from {self.ckpt} (stage {state['stage'] or 'boundary'}, step {state['step']})")
        if not self.trail:
            self.trail.append(("transfer", self._measure("transfer")))
            with self.clock("checkpoints"):
                self._save(stage=None)
        for s in (1, 2, 3):
            cfg = r.stage(s)
            if not cfg.enabled or s in self.completed:
                continue
            if not self.nodes and s in (1, 2):
                raise SurgeryError(f"stage {s} needs replaced nodes but the recipe replaces none; disable it")
            seq_len = r.seq_len(s)
            stream = RankShard(BatchStream(self.corpus.train, seq_len=seq_len, batch_size=cfg.micro_batch,
                                           seed=r.data_seed * 1009 + s), self.ranks.rank, self.ranks.world_size)
            parallel = strategy_for(s, self.ranks, r.distributed)  # distributed: data-parallel or FSDP2
            trained = parallel.prepare(self.student)
            runner = StageRunner(
                s, cfg, make_objective(s, r, self.teacher.model, trained, self.nodes), stream,
                seq_len=seq_len, device=self.device, precision=r.precision, log=self.log,
                save=lambda step, opt, s=s, stream=stream, parallel=parallel: self._save(
                    stage=s, step=step, stream=stream.state_dict(), optimizer=opt, parallel=parallel),
                parallel=parallel,
            )
            start = 0
            if state.get("stage") == s:
                stream.load_state_dict(state["stream"])
                load_optimizer(self.ckpt, runner.optimizer)
                start = state["step"]
            with self.clock(f"stage{s}"):  # compilation and the stage's checkpoints included
                with stage_compiled(s, self.teacher.model, self.student, [n.block for n in self.nodes]) \
                        if getattr(cfg, "compile", False) else nullcontext():
                    summary = runner.run(start)
                parallel.finish(self.student)
            self.stage_info[s].update(summary)
            self.trail.append((f"after_stage{s}", self._measure(f"after stage {s}")))
            self.completed.append(s)
            with self.clock("checkpoints"):
                self._save(stage=None)
            state = {"stage": None}
        self.log.close()

    def save(self) -> Path:
        from .io import atomic_dir
        from .student import save_student

        if not self.ranks.is_main:  # distributed: rank 0 writes the student
            return self.out
        report = build_report(teacher=self.teacher.ref, trail=self.trail, stages=self.stage_info, name=self.recipe.name)
        dtype = autocast_dtype(self.recipe.precision, self.device)
        report["compute"] = {"device": str(self.device), "precision": self.recipe.precision,
                             "autocast": str(dtype).removeprefix("torch.") if dtype is not None else "float32"}
        for warning in report["warnings"]:
            logger.warning("warning: %s", warning)
        report["timings"] = self.clock.to_dict()  # up to here; the log line after the write adds the save
        if self.layer_choice is not None:
            report["layer_choice"] = {"text": self.layer_choice.to_text(), **self.layer_choice.to_dict()}
        with self.clock("save"):
            with atomic_dir(self.out, overwrite=self.overwrite) as tmp:
                plots = [p for p in (plot_per_layer(before_after_series(report), tmp / "per_layer.png"),
                                     plot_losses(self.log.read(), tmp / "losses.png")) if p is not None]
                shutil.copy(self.work / "metrics.jsonl", tmp / "metrics.jsonl")
                save_student(tmp, self.student, tokenizer=self.teacher.tokenizer, plan=self.plan, recipe=self.recipe,
                             teacher=self.teacher, report=report,
                             report_md=report_markdown(report, [p.name for p in plots]))
            if not self.recipe.output.keep_checkpoints:
                shutil.rmtree(self.work, ignore_errors=True)
        logger.info("time: %s", self.clock.summary())
        return self.out


def _disk_full(run: Run, err: BaseException) -> TrainingError:
    """The message for a full disk: whether ``--resume`` can continue, and from where."""
    what = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else str(err).strip()
    state = read_state(run.ckpt) if (run.ckpt / "state.json").is_file() else None
    if state is None:
        then = "nothing was checkpointed yet: free some space and run the same command again"
    else:
        where = (f"stage {state['stage']}, step {state['step']}" if state.get("stage")
                 else f"stages done: {', '.join(map(str, state['completed'])) or 'none'}")
        then = ("free some space, then run the same command with --resume: it continues from the last checkpoint "
                f"({where}) and reaches the same weights as an uninterrupted run")
    return TrainingError(f"no space left on device ({what}); {then}")


def apply(recipe: Recipe, options: ApplyOptions | None = None) -> Path:
    """Run the whole job described by ``recipe``; returns the student directory.

    Holds the lock on ``<out>.partial`` throughout; a second run on the same output is refused.
    """
    run = Run(recipe, options)
    run.check_output()  # before the lock creates <out>.partial: a refused run writes nothing
    run.ranks = init_ranks(recipe.device)  # distributed: rank 0 alone holds the lock and tidies
    main = run.ranks.is_main
    with hold_work_dir(run.work) if main else nullcontext():
        if main:
            tidy_atomic_leftovers(run.ckpt)  # a checkpoint write killed between its two renames
        run.ranks.barrier()  # distributed: the others read the work directory once it is tidy
        run.setup()
        if main:
            tidy_atomic_leftovers(run.out)  # a final write killed before its rename
        try:
            run.train()
            out = run.save()
        except Exception as err:
            if is_disk_full(err):
                raise _disk_full(run, err) from err
            raise
    run.ranks.barrier()  # distributed: every rank returns once the student is written
    run.ranks.close()
    return out
