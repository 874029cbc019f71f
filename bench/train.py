"""Training throughput per MOHAWK stage: the plain path and the fast path side by side, one run.

    python bench/train.py                                  # GPU: recipes/smollm2_mamba_gpu.yaml's shapes, 6 timed steps
    python bench/train.py recipes/smollm2_hybrid.yaml --steps 4 --stages 3
    python bench/train.py --cpu-smoke                      # tiny random teacher on CPU (CI runs this)
    python bench/train.py --stages 3 --paths fast --profile /tmp/prof   # where one step's time goes

For each stage and path, the recipe's own objective and stage runner (the code ``surgery apply``
runs) train the recipe's student for ``--warmup`` untimed and ``--steps`` timed optimizer steps
on random tokens (speed does not depend on the text), at the recipe's micro-batch, sequence
length and precision. Paths:

* ``plain`` -- the plain-torch SSD (``ops.use_backend("reference")``), stage 1 from the teacher's
  attention probabilities replayed under eager attention and the materialised student matrix,
  stage 3 on full ``(b, L, vocab)`` logits: what surgery ran before the fused kernels;
* ``fast``  -- the defaults: fused SSD kernels on CUDA, stage 1 from the teacher's ``q``/``k``
  without ``L x L`` tensors, stage 3 fused with the LM heads;
* ``compiled`` -- ``fast`` with the decoder blocks under ``torch.compile``, what a stage's
  ``compile: true`` runs (:func:`verify.compiled.stage_compiled`): the student's in stages 2-3, the
  teacher's in stage 3 (stage 1 has no row: its teacher records calls through hooks and the student
  runs no blocks). ``plain`` and ``fast`` run eager whatever the recipe says;
* ``graphs`` -- ``compiled`` with ``mode="reduce-overhead"``: the compiled blocks replayed as CUDA
  graphs (cutting the host's kernel launches; not a recipe option yet).

``--profile DIR`` runs one more optimizer step per stage and path under ``torch.profiler`` and
prints where its time went: wall time against the time the device was busy (a gap means the host
launching kernels is the limit), the kernel time by kind (matmuls, Triton kernels, convolutions,
element-wise, reductions, copies) and the top kernels; ``DIR`` gets the tables and a Chrome trace
per stage and path (open in https://ui.perfetto.dev).

Columns: tokens/s; MFU = 8 x teacher parameters x tokens/s / ``--peak-tflops`` (the convention of
the throughput issue: a teacher forward, 2N, and a student forward and backward, 6N, per token,
applied to every stage); peak memory (``torch.cuda.max_memory_allocated``, GPU only); fast/plain.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from surgery import ops  # noqa: E402


class RandomBatches:
    """Random token batches ``(batch, seq_len)`` from the vocabulary (a BatchStream's interface)."""

    def __init__(self, vocab: int, batch: int, seq_len: int, seed: int = 0) -> None:
        self.vocab, self.shape = vocab, (batch, seq_len)
        self.g = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        return torch.randint(3, self.vocab, self.shape, generator=self.g)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "smollm2_mamba_gpu.yaml"))
    p.add_argument("overrides", nargs="*", help="recipe overrides KEY=VALUE")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--paths", default="plain,fast")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per stage and path")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (kernel compilation)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matmul peak for MFU (H200 measured: ~790)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny random teacher on CPU, one step each")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile one more step per stage and path; tables and Chrome traces go to DIR")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    if args.cpu_smoke:
        args.recipe = str(ROOT / "recipes" / "tiny.yaml")
        args.overrides = [*args.overrides, "device=cpu", "data.seq_len=32",
                          *(f"stages.stage{i}.tokens_per_step=64" for i in (1, 2, 3))]
        args.steps, args.warmup = 1, 1
    return args


def stage_config(cfg: Any, steps: int) -> Any:
    """The recipe's stage options, with a budget of ``steps`` optimizer steps and no checkpoints."""
    return cfg.model_copy(update={"tokens": steps * cfg.tokens_per_step, "checkpoint_every": 10**9, "log_every": 10**9})


def run_stage(stage: int, path: str, recipe: Any, teacher: torch.nn.Module, student: torch.nn.Module,
              nodes: list, device: torch.device, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from surgery.pipeline import make_objective
    from verify.runner import StageRunner

    cfg = recipe.stage(stage)
    seq_len = recipe.seq_len(stage)
    vocab = teacher.config.get_text_config(decoder=True).vocab_size
    backend = ops.use_backend("reference") if path == "plain" else contextlib.nullcontext()

    def runner(steps: int, seed: int) -> StageRunner:
        objective = make_objective(stage, recipe, teacher, student, nodes)
        if path == "plain":  # what surgery computed before the fused kernels
            if hasattr(objective, "factored"):
                objective.factored = False
            if hasattr(objective, "fused"):
                objective.fused = False
        return StageRunner(stage, stage_config(cfg, steps), objective, RandomBatches(vocab, cfg.micro_batch, seq_len, seed),
                           seq_len=seq_len, device=device, precision=recipe.precision, log=log, save=lambda *a: None)

    from verify.compiled import stage_compiled

    blocks = [n.block for n in nodes]
    compiled = (stage_compiled(stage, teacher, student, blocks) if path == "compiled"
                else stage_compiled(stage, teacher, student, blocks, mode="reduce-overhead") if path == "graphs"
                else contextlib.nullcontext())
    with backend, compiled:  # the recipe's own `compile` is ignored: the path says
        runner(args.warmup, 1).run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        timed = runner(args.steps, 2)
        t0 = time.perf_counter()
        timed.run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        if args.profile:
            from step_profile import profile_run

            profile_run(runner(1, 3).run, device, Path(args.profile) / f"stage{stage}-{path}")
    tokens = args.steps * cfg.tokens_per_step
    n_params = sum(p.numel() for p in teacher.parameters())
    rate = tokens / seconds
    row = {"stage": stage, "path": path, "tokens_per_s": rate, "mfu": 8 * n_params * rate / (args.peak_tflops * 1e12),
           "seconds": seconds, "micro_batch": cfg.micro_batch, "seq_len": seq_len}
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from surgery.log import configure
    from surgery.recipe import Recipe
    from surgery.rewriter import rewrite
    from surgery.runtime import resolve_device, seed_everything
    from surgery.teacher import load_teacher
    from verify.metrics import MetricsLog
    from verify.objective import replaced_nodes

    args = parse_args(argv)
    configure(quiet=True)
    recipe = Recipe.load(args.recipe, args.overrides)
    device = resolve_device(recipe.device)
    seed_everything(recipe.seed)
    teacher = load_teacher(recipe.teacher, device=device, progress=False).model
    student, _ = rewrite(teacher, recipe.replace)
    nodes = replaced_nodes(student)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {recipe.name} on {name}, precision={recipe.precision}, teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M "
          f"parameters; {args.steps} timed steps after {args.warmup}; MFU at {args.peak_tflops:g} TFLOP/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log = MetricsLog(Path(tmp) / "metrics.jsonl")
        for stage in (int(s) for s in args.stages.split(",")):
            if not recipe.stage(stage).enabled:
                continue
            for path in args.paths.split(","):
                if path in ("compiled", "graphs") and stage == 1:
                    continue
                rows.append(run_stage(stage, path, recipe, teacher, student, nodes, device, args, log))
        log.close()
    header = "| stage | path | micro-batch x seq | tokens/s | MFU | peak GiB | fast / plain |"
    print(header)
    print("| --- " * 7 + "|")
    plain = {r["stage"]: r["tokens_per_s"] for r in rows if r["path"] == "plain"}
    for r in rows:
        ratio = f"{r['tokens_per_s'] / plain[r['stage']]:.2f}x" if r["stage"] in plain else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        print(f"| {r['stage']} | {r['path']} | {r['micro_batch']} x {r['seq_len']} | {r['tokens_per_s']:.0f} | "
              f"{100 * r['mfu']:.1f}% | {peak} | {ratio} |")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
