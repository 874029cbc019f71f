"""The largest batch each model decodes at a given context: the teacher's KV cache against the student's fixed state.

    python bench/decode_capacity.py --contexts 16384,65536          # GPU: SmolLM2 teacher vs its untrained
                                                                    #      all-discrete_mamba2 student, bf16
    python bench/decode_capacity.py --teacher /tmp/smolr --contexts 16384,65536 --jsonl rows.jsonl
    python bench/decode_capacity.py --cpu --teacher random:llama --contexts 64 --max-batch 4   # smoke

For each model, context ``L`` and batch ``b = 1, 2, 4, ...`` up to ``--max-batch``, one trial
prefills ``b`` random prompts of ``L`` tokens in pieces of ``--chunk`` tokens (the cache carried from
piece to piece, as a server would, so the prefill's own activations stay those of one piece and the
trial measures the cache), then takes ``--steps`` greedy decode steps. The first batch that runs out
of device memory ends the search for that model and context. A row gives the largest batch that ran
(a power of two: the true limit lies below twice it), the cache it held, its decode ms/token and
tokens/s, and the batch that failed.

On a GPU the search jumps after batch 1 (``--no-jump`` doubles from 1 instead): the first trial's
cache per sequence and the device's free memory give the largest power of two whose caches would
fill 80% of it; the search tries that, doubles while it runs and halves while it runs out of
memory. At 64k context the teacher's trials from batch 1 up took the whole of a 150 s call on an
H200 (each prefills batch x 64k tokens); the jump skips most of them and finds the same power of two.

The student's state has the same size after any number of tokens (``tests/test_decode_bench.py``
checks it), so ``--student-prompt N`` (default 256) prefills the student with ``N`` tokens, not
``L``: a prefill of 16k x 64k tokens would take the bench's whole time and change nothing in the
memory a decode step needs. Its rows say so (``prompt``). Pass ``--student-prompt 0`` to prefill it
with the full context too.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery.hf_conventions import cache_keyword, output_cache  # noqa: E402


def _decode_bench() -> Any:
    """bench/decode.py as a module (models, cache bytes, timers)."""
    spec = importlib.util.spec_from_file_location("bench_decode_for_capacity", ROOT / "bench" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="builtin:smollm2-135m", help="teacher reference (default: the embedded SmolLM2)")
    p.add_argument("--student", default=None, help="a student directory (default: the teacher rewritten, untrained)")
    p.add_argument("--mixer", default="discrete_mamba2", help="mixer replacing every attention node")
    p.add_argument("--cpu", action="store_true", help="quick CPU mode (fp32; nothing runs out of memory there)")
    p.add_argument("--contexts", default=None, help="comma-separated contexts (GPU 16384,65536; CPU 64)")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch tried (GPU 16384; CPU 4)")
    p.add_argument("--chunk", type=int, default=4096, help="prefill piece, tokens")
    p.add_argument("--student-prompt", type=int, default=256,
                   help="tokens the student is prefilled with (0: the full context; its state's size does not depend on it)")
    p.add_argument("--steps", type=int, default=4, help="timed decode steps per trial")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="GPU bf16, CPU fp32")
    p.add_argument("--jump", action=argparse.BooleanOptionalAction, default=True,
                   help="after batch 1, jump to the batch whose caches would fill 80%% of free device memory (GPU)")
    p.add_argument("--jsonl", default=None, help="append each row to this file as it is measured")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    args.device = torch.device("cuda" if gpu else "cpu")
    args.contexts = [int(t) for t in (args.contexts or ("16384,65536" if gpu else "64")).split(",") if t.strip()]
    args.max_batch = args.max_batch if args.max_batch is not None else (16384 if gpu else 4)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    if min(args.contexts) < 1 or args.chunk < 1 or args.steps < 1 or args.max_batch < 1 or args.student_prompt < 0:
        p.error("--contexts, --chunk, --steps and --max-batch take positive numbers, --student-prompt >= 0")
    # what bench/decode.py's build_models reads
    args.hybrid, args.fair, args.cuda_graph, args.compile = 0, False, False, False
    return args


def _out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


@torch.no_grad()
def trial(model: torch.nn.Module, batch: int, prompt: int, args: argparse.Namespace, bench: Any) -> dict[str, Any]:
    """Prefill ``batch`` x ``prompt`` random tokens in pieces, then time ``args.steps`` greedy decode steps."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    g = torch.Generator().manual_seed(prompt * 31 + batch)
    kw = bench._forward_kwargs(model)
    cache = None
    for start in range(0, prompt, args.chunk):
        ids = torch.randint(0, vocab, (batch, min(args.chunk, prompt - start)), generator=g).to(args.device)  # (b, piece)
        step_kw = {} if cache is None else {cache_keyword(model.forward): cache}
        out = model(ids, use_cache=True, **kw, **step_kw)
        cache = output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)  # (b, 1)
        del out
    step_kw = {**kw, cache_keyword(model.forward): cache, "use_cache": True}
    nxt = model(nxt, **step_kw).logits[:, -1:].argmax(-1)  # one untimed step
    timer = bench.Timer(args.device)
    timer.start()
    for _ in range(args.steps):
        nxt = model(nxt, **step_kw).logits[:, -1:].argmax(-1)
    ms = timer.stop() / args.steps
    return {"cache_bytes": bench.cache_bytes(cache), "ms_per_token": ms, "tokens_per_s": batch * 1e3 / ms}


def free_bytes(device: torch.device) -> int | None:
    """Free device memory in bytes (None off CUDA, where nothing runs out of memory first)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def jump_target(cache_bytes: int, args: argparse.Namespace) -> int:
    """The batch to try after batch 1: the largest power of two whose caches fill <= 80% of free memory."""
    free = free_bytes(args.device) if args.jump else None
    if not free or cache_bytes <= 0:
        return 2
    fits = int(0.8 * free // cache_bytes)
    return max(2, min(1 << max(fits.bit_length() - 1, 0), args.max_batch))


def largest_batch(name: str, model: torch.nn.Module, context: int, args: argparse.Namespace, bench: Any) -> dict[str, Any]:
    """The largest power-of-two batch that runs: batch 1, a jump (:func:`jump_target`), then doubling or halving."""
    prompt = min(args.student_prompt, context) if name == "student" and args.student_prompt else context
    row: dict[str, Any] = {"model": name, "context": context, "prompt": prompt, "largest_batch": 0}
    ran, failed = 0, None  # the largest batch that ran, the smallest that failed
    batch = 1
    while batch <= args.max_batch and batch > ran and (failed is None or batch < failed):
        try:
            result = trial(model, batch, prompt, args, bench)
        except Exception as err:  # noqa: BLE001 - out of memory ends the search; anything else is reported
            failed = batch
            row["failed_batch"] = batch
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
            row["out_of_memory"] = _out_of_memory(err)
            if not row["out_of_memory"]:
                break
            batch //= 2  # after a jump the limit may lie below it: halve until a batch runs
            continue
        finally:
            gc.collect()
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
        ran = batch
        row.update(largest_batch=batch, **result)
        batch = jump_target(result["cache_bytes"], args) if batch == 1 else batch * 2
    row["reached_max_batch"] = "failed_batch" not in row
    return row


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    gpu = args.device.type == "cuda"
    title = (f"device {args.device} ({torch.cuda.get_device_name(args.device) if gpu else 'cpu'}), dtype {args.dtype}, "
             f"teacher {args.teacher}, prefill pieces of {args.chunk} tokens, {args.steps} timed decode steps per trial")
    head = ["model", "context", "prompt tokens", "largest batch", "cache MiB", "ms/token", "tok/s", "first failure"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        fit = f"{r['largest_batch']}" + (f" (>= {r['largest_batch']}: --max-batch)" if r["reached_max_batch"] else "")
        have = "ms_per_token" in r
        failure = "" if r["reached_max_batch"] else f"{r['failed_batch']}: {'out of memory' if r.get('out_of_memory') else r['error']}"
        lines.append("| " + " | ".join([
            r["model"], str(r["context"]), str(r["prompt"]), fit,
            f"{r['cache_bytes'] / 2**20:.1f}" if have else "", f"{r['ms_per_token']:.2f}" if have else "",
            f"{r['tokens_per_s']:.0f}" if have else "", failure]) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    bench = _decode_bench()
    args.dtype = bench.DTYPES[args.dtype]
    teacher, student = bench.build_models(args)
    rows = []
    for context in args.contexts:
        for name, model in (("teacher", teacher), ("student", student)):
            rows.append(largest_batch(name, model, context, args, bench))
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    args.dtype = str(args.dtype).removeprefix("torch.")
    print(table(rows, args))
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.manual_seed(0)
    return run(args)


if __name__ == "__main__":
    main()
