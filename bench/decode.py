"""Decode latency and memory: a student (every attention replaced by an SSM mixer) vs its teacher.

    python bench/decode.py                          # GPU: SmolLM2-135M teacher vs all-discrete_mamba2 student, bf16,
                                                    #      batch 1 and 8, contexts 1k / 4k / 16k
    python bench/decode.py --cuda-graph             # also a CUDA-graph-captured student decode step
    python bench/decode.py --cuda-graph --compile   # ... and the same step torch.compile'd before capture
    python bench/decode.py --compile --tuned --batches 1   # ... and compiled with coordinate-descent tuning
    python bench/decode.py --cuda-graph --hybrid 7  # a hybrid student keeping 7 attention layers (every 4th of 30)
    python bench/decode.py --cpu                    # quick CPU run: context 256, batch 1 and 4
    python bench/decode.py --cpu --teacher random:llama --contexts 32 --batches 1,2 --steps 4   # smoke
    python bench/decode.py --student runs/smollm2-mamba                                      # a trained student

The student is ``surgery.rewrite(teacher, [discrete_mamba2 everywhere])`` with untrained weights
(speed does not depend on them) unless ``--student DIR`` names a saved one. For each model,
batch and context: an untimed and a timed prefill of ``context`` random tokens (``logits_to_keep=1``;
the untimed one compiles the kernels for that shape, skipped with ``--warmup 0``), then
``--warmup`` untimed and ``--steps`` timed greedy decode steps, each one ``model(next_token,
cache=cache)`` (what ``generate`` does per token, without its bookkeeping). Columns:

* ``ms/token``   -- decode time per step (CUDA events on GPU, perf_counter on CPU); ``tok/s`` = batch / that,
* ``prefill peak`` / ``decode peak`` -- ``torch.cuda.max_memory_allocated`` during the prefill / the timed
  decode steps (weights and cache included; GPU only),
* ``state``      -- bytes held by the cache after decoding (KV for the teacher, SSM + conv state for the student),
* ``vs teacher`` -- teacher ms/token / this row's ms/token (> 1: faster than the teacher).
* ``teacher static`` rows (``--fair``, the default on GPU) -- the teacher at its own best: ``generate`` with
  transformers' static KV cache, which compiles the decoding step on CUDA; ms/token from two runs,
  ``(t(1 + steps new tokens) - t(1 new token)) / steps``, after one warm-up run of each;
* ``vs teacher best`` -- the fastest teacher row (eager or static) / the student's fastest (eager or graph):
  the fair ratio.

``--cuda-graph`` captures one whole student decode step (the HF forward with the recurrent cache,
its state tensors, positions and -- hybrids -- a fixed-size KV cache for the kept attention layers
kept in static buffers; :mod:`surgery.graph_decode`) in a CUDA graph and replays it; the first
replay is checked against an eager step (``graph max|diff|``). On CPU the same static step runs
uncaptured. ``--compile`` adds ``compiled`` columns: the step wrapped in ``torch.compile`` before
warm-up and capture, timed in the same run; ``--tuned`` adds ``tuned`` columns: compiled with
inductor's coordinate-descent tuning, which at batch 1 fuses each one-row matmul into its neighbours
as a reduction. The step runs each mixer's input projections as one
stacked matmul (:func:`surgery.graph_decode.fuse_decode_projections`); ``--unfused`` adds columns for
the same step (compiled with ``--compile``) with the separate projections. ``--hybrid N`` keeps the attention of N layers, every
``n_layers // N``-th (layers 3, 7, ..., 27 of SmolLM2's 30 for N = 7), and converts the rest.
A row that fails prints the error instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.hf_conventions import cache_keyword, output_cache  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="builtin:smollm2-135m", help="teacher reference (default: the embedded SmolLM2)")
    p.add_argument("--student", default=None, help="a student directory (default: the teacher rewritten, untrained)")
    p.add_argument("--cpu", action="store_true", help="quick CPU mode (small context and batches, fp32)")
    p.add_argument("--contexts", default=None, help="comma-separated prompt lengths (GPU 1024,4096,16384; CPU 256)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (GPU 1,8; CPU 1,4)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (GPU 64; CPU 16)")
    p.add_argument("--warmup", type=int, default=None, help="untimed decode steps first (GPU 8; CPU 2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="GPU bf16, CPU fp32")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time a CUDA-graph-captured student decode step (CPU: the static step, uncaptured)")
    p.add_argument("--compile", action="store_true",
                   help="also time the graphed step torch.compile'd before capture (implies --cuda-graph)")
    p.add_argument("--tuned", action="store_true",
                   help="also time the step compiled with inductor's coordinate-descent tuning (one-row matmuls "
                        "fused as reductions; implies --cuda-graph)")
    p.add_argument("--hybrid", type=int, default=0, metavar="N",
                   help="the student keeps the attention of N evenly spaced layers (every n_layers // N-th)")
    p.add_argument("--mixer", default="discrete_mamba2", help="mixer replacing every attention node")
    p.add_argument("--fair", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the teacher with a static KV cache (default: on GPU)")
    p.add_argument("--unfused", action="store_true",
                   help="also time the graph step (compiled with --compile) with each mixer's input projections "
                        "as separate matmuls, not stacked into one (the default)")
    p.add_argument("--jsonl", default=None, help="also append each row to this file as its shape is done")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    args.device = torch.device("cuda" if gpu else "cpu")
    args.contexts = _ints(args.contexts or ("1024,4096,16384" if gpu else "256"))
    args.batches = _ints(args.batches or ("1,8" if gpu else "1,4"))
    args.steps = args.steps or (64 if gpu else 16)
    args.warmup = args.warmup if args.warmup is not None else (8 if gpu else 2)
    args.dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    args.cuda_graph = args.cuda_graph or args.compile or args.unfused or args.tuned
    if args.hybrid < 0 or (args.hybrid and args.student):
        p.error("--hybrid takes N >= 0 and builds its own student (not with --student)")
    args.fair = gpu if args.fair is None else args.fair
    return args


# --------------------------------------------------------------------------- models


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(teacher, student) on the device in the bench dtype, eval mode."""
    import surgery
    from surgery.teacher import load_teacher

    teacher = load_teacher(args.teacher, device=args.device, dtype=args.dtype, progress=False).model
    if args.student:
        student = surgery.load(args.student, device=args.device, dtype=args.dtype)
    else:
        args.kept = keep = kept_layers(teacher.config.get_text_config(decoder=True).num_hidden_layers, args.hybrid)
        rules = ([{"layers": keep, "mixer": "keep"}] if keep else []) + [{"mixer": args.mixer}]
        student, _ = surgery.rewrite(teacher, rules)
        student = student.to(device=args.device, dtype=args.dtype)
    for m in (teacher, student):
        m.eval().requires_grad_(False)
        m.generation_config.eos_token_id = None
    return teacher, student


def kept_layers(n_layers: int, n_kept: int) -> list[int]:
    """The ``n_kept`` attention layers a ``--hybrid`` student keeps: every ``n_layers // n_kept``-th, from the stride's end."""
    if n_kept > n_layers:
        raise ValueError(f"--hybrid {n_kept}: the teacher has only {n_layers} layers")
    stride = n_layers // n_kept if n_kept else 0
    return [stride * (k + 1) - 1 for k in range(n_kept)]


def cache_bytes(cache: Any) -> int:
    """Bytes of every tensor a cache holds (KV, SSM and conv states)."""
    total, seen = 0, set()
    for layer in getattr(cache, "layers", []):
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        for name in ("recurrent_states", "conv_states"):  # dict {state index: tensor} (a list in some versions)
            states = getattr(layer, name, None) or []
            tensors += list(states.values() if isinstance(states, dict) else states)
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Milliseconds between ``start()`` and ``stop()`` (CUDA events on GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.device.type == "cuda":
            self.b.record()
            torch.cuda.synchronize(self.device)
            return self.a.elapsed_time(self.b)
        return (time.perf_counter() - self.t0) * 1e3


# --------------------------------------------------------------------------- one measurement


@torch.no_grad()
def measure(model: torch.nn.Module, batch: int, context: int, args: argparse.Namespace) -> dict[str, Any]:
    """Prefill ``context`` tokens, then time ``args.steps`` greedy decode steps."""
    device = args.device
    vocab = model.config.get_text_config(decoder=True).vocab_size
    g = torch.Generator().manual_seed(context * 31 + batch)
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(device)  # (b, L)
    kw = _forward_kwargs(model)
    timer = Timer(device)
    if args.warmup:  # an untimed prefill first: the kernels' first call at this shape compiles / autotunes them
        model(ids, use_cache=True, **kw)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer.start()
    out = model(ids, use_cache=True, **kw)
    prefill_ms = timer.stop()
    prefill_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    cache = output_cache(out)
    step_kw = {**kw, cache_keyword(model.forward): cache, "use_cache": True}
    nxt = out.logits[:, -1:].argmax(-1)  # (b, 1)
    del out
    for _ in range(args.warmup):
        nxt = model(nxt, **step_kw).logits[:, -1:].argmax(-1)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    timer.start()
    for _ in range(args.steps):
        nxt = model(nxt, **step_kw).logits[:, -1:].argmax(-1)
    ms = timer.stop() / args.steps
    row = {"batch": batch, "context": context, "prefill_ms": prefill_ms, "ms_per_token": ms,
           "tokens_per_s": batch * 1e3 / ms, "state_bytes": cache_bytes(cache), "cache": type(cache).__name__}
    if device.type == "cuda":
        row["decode_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row["prefill_peak_bytes"] = prefill_peak
    if args.cuda_graph and hasattr(model, "new_surgery_cache"):
        import copy

        for prefix, compiled, fuse in graph_variants(args):  # each from a copy of the same cache (a decoder owns its cache)
            row.update(graph_decode(model, copy.deepcopy(cache), nxt, args, compile=compiled, fuse=fuse, prefix=prefix))
    del cache, step_kw
    return row


VARIANTS = ("graph", "compiled", "tuned", "unfused")  # the graph-step column groups, in table order


def graph_variants(args: argparse.Namespace) -> list[tuple[str, bool | str, bool]]:
    """``(prefix, compile, fuse)`` of each graph-step variant the flags ask for, in :data:`VARIANTS` order."""
    if not args.cuda_graph:
        return []
    asked = {"graph": (False, True), "compiled": (True, True) if args.compile else None,
             "tuned": ("tuned", True) if args.tuned else None,
             # the best variant above with separate input projections, side by side
             "unfused": (args.compile, False) if args.unfused else None}
    return [(p, *asked[p]) for p in VARIANTS if asked[p] is not None]


def graph_decode(model: torch.nn.Module, cache: Any, nxt: torch.Tensor, args: argparse.Namespace, *,
                 compile: bool | str = False, fuse: bool = True, prefix: str = "graph") -> dict[str, Any]:
    """Time the CUDA-graph-captured decode step (:mod:`surgery.graph_decode`; on CPU the static step, uncaptured),
    torch.compile'd first with ``compile``; its first step is checked against an eager, uncompiled step from the
    same state. Keys ``{prefix}_ms_per_token``, ``{prefix}_max_diff`` or ``{prefix}_error``."""
    from surgery.graph_decode import GraphedDecoder

    try:
        device = args.device
        max_len = cache.get_seq_length() + 2 * (args.warmup + args.steps) + 4  # a hybrid's kept KV: room for every step
        t0 = time.perf_counter()
        dec = GraphedDecoder(model, cache, nxt, greedy=True, capture=device.type == "cuda", max_len=max_len,
                             compile=compile, fuse=fuse)
        _sync(device)
        setup_s = time.perf_counter() - t0  # warm-up, compilation (with compile) and capture
        if dec.compile_error:
            raise RuntimeError(f"torch.compile fell back: {dec.compile_error}")
        snap = dec.step.snapshot()
        reference = dec.step.step(eager=True)[:, -1].float().clone()  # eager, from the captured starting state
        dec.step.restore(snap)
        diff = (dec().float() - reference).abs().max().item()
        for _ in range(args.warmup):
            dec()
        timer = Timer(device)
        timer.start()
        for _ in range(args.steps):
            dec()
        ms = timer.stop() / args.steps
        if dec.compile_error:
            raise RuntimeError(f"torch.compile fell back: {dec.compile_error}")
        return {f"{prefix}_ms_per_token": ms, f"{prefix}_max_diff": diff, f"{prefix}_setup_s": setup_s}
    except Exception as err:  # noqa: BLE001 - report, do not abort the table
        return {f"{prefix}_error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:120]}


@torch.no_grad()
def teacher_static(model: torch.nn.Module, batch: int, context: int, args: argparse.Namespace) -> dict[str, Any]:
    """The teacher's decode ms/token through ``generate`` with a static KV cache (its best transformers path)."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    g = torch.Generator().manual_seed(context * 31 + batch)
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(args.device)

    def gen(new: int) -> float:
        timer = Timer(args.device)
        timer.start()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, cache_implementation="static", pad_token_id=0)
        return timer.stop()

    try:
        gen(1), gen(1 + args.steps)  # warm-up: compilation of the prefill and decode steps
        ms = (gen(1 + args.steps) - gen(1)) / args.steps
        return {"model": "teacher static", "batch": batch, "context": context, "ms_per_token": ms,
                "tokens_per_s": batch * 1e3 / ms}
    except Exception as err:  # noqa: BLE001 - report, do not abort the table
        return {"model": "teacher static", "batch": batch, "context": context,
                "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:120]}


def fair_ratio(rows: list[dict[str, Any]], batch: int, context: int) -> float | None:
    """Fastest teacher ms/token over the fastest student ms/token (eager or graph) at one shape."""
    def best(prefix: str) -> float | None:
        times = [t for r in rows if r["model"].startswith(prefix) and (r["batch"], r["context"]) == (batch, context)
                 for t in (r.get("ms_per_token"), *(r.get(f"{v}_ms_per_token") for v in VARIANTS)) if t]
        return min(times) if times else None

    teacher, student = best("teacher"), best("student")
    return teacher / student if teacher and student else None


# --------------------------------------------------------------------------- table


def _mib(n: Any) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def run(args: argparse.Namespace, report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    teacher, student = build_models(args)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            base = None
            for name, model in (("teacher", teacher), ("student", student)):
                try:
                    row = {"model": name, **measure(model, batch, context, args)}
                except Exception as err:  # noqa: BLE001 - e.g. out of memory: report and go on
                    row = {"model": name, "batch": batch, "context": context,
                           "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:120]}
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
                if name == "teacher":
                    base = row.get("ms_per_token")
                row["vs_teacher"] = base / row["ms_per_token"] if base and row.get("ms_per_token") else None
                rows.append(row)
            if args.fair:
                rows.append(teacher_static(teacher, batch, context, args))
            for row in rows[-(3 if args.fair else 2):]:
                row["vs_teacher_best"] = fair_ratio(rows, batch, context) if row["model"] == "student" else None
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
    report(table(rows, args))
    return rows


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    gpu = args.device.type == "cuda"
    head = ["model", "batch", "context", "prefill ms", "prefill peak MiB", "ms/token", "tok/s", "decode peak MiB",
            "state MiB", "vs teacher", "vs teacher best"]
    variants = [p for p, _, _ in graph_variants(args)]
    for prefix in variants:
        head += [f"{prefix} ms/token", f"{prefix} vs teacher", f"{prefix} max|diff|"]
    keep = getattr(args, "kept", [])
    converted = f"attention kept in layers {keep}, the rest" if keep else "all attention"
    title = (f"device {args.device} ({torch.cuda.get_device_name(args.device) if gpu else 'cpu'}), dtype "
             f"{str(args.dtype).removeprefix('torch.')}, teacher {args.teacher}, student "
             f"{args.student or converted + ' -> ' + args.mixer + ' (untrained)'}, {args.steps} timed steps"
             + ("" if gpu or not variants else "; graph = the static step, uncaptured (no CUDA)"))
    lines = [title, "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    teacher_ms: dict[tuple[int, int], float] = {}
    for r in rows:
        if r["model"] == "teacher" and r.get("ms_per_token"):
            teacher_ms[(r["batch"], r["context"])] = r["ms_per_token"]
        if "error" in r:
            cells = [r["model"], str(r["batch"]), str(r["context"]), r["error"]] + [""] * (len(head) - 4)
        else:
            ratio, fair = r.get("vs_teacher"), r.get("vs_teacher_best")
            prefill = f"{r['prefill_ms']:.1f}" if "prefill_ms" in r else ""
            state = _mib(r["state_bytes"]) if "state_bytes" in r else ""
            cells = [r["model"], str(r["batch"]), str(r["context"]), prefill,
                     _mib(r.get("prefill_peak_bytes")), f"{r['ms_per_token']:.2f}",
                     f"{r['tokens_per_s']:.0f}", _mib(r.get("decode_peak_bytes")),
                     state, f"{ratio:.2f}x" if ratio else "", f"{fair:.2f}x" if fair else ""]
            for prefix in variants:
                if f"{prefix}_ms_per_token" in r:
                    ms, base = r[f"{prefix}_ms_per_token"], teacher_ms.get((r["batch"], r["context"]))
                    cells += [f"{ms:.2f}", f"{base / ms:.2f}x" if base else "", f"{r[f'{prefix}_max_diff']:.2g}"]
                else:
                    cells += [r.get(f"{prefix}_error", ""), "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.manual_seed(0)
    return run(args)


if __name__ == "__main__":
    main()
