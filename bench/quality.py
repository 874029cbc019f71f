"""Held-out quality of a student against its teacher, where a user would measure it.

    python bench/quality.py runs/smollm2-mamba-gpu                 # the default suite, 16k tokens a set
    python bench/quality.py runs/smollm2-mamba --tokens 8192 --seq-len 256 --json out.json

Every set is scored by the teacher and the student on the very same token batches; the table
gives each perplexity, their ratio (student / teacher: 1.0 is the teacher's quality) and top-1
agreement (how often the two models' most likely next tokens agree). Sets:

* ``english-news``  -- the Lee corpus of news articles (``builtin:news``), every document: text no
  shipped recipe trains on;
* ``english-wiki``  -- the Wikipedia articles (``builtin:wikipedia``) held out in the student's own
  training split (all of them when it did not train on Wikipedia);
* ``python-3rd-party`` -- the source of an installed third-party package no recipe trains on
  (``--package``, default networkx, a dependency of surgery), every file;
* ``python-stdlib`` -- the standard library files held out in the student's split (the training
  distribution of the code recipes, for comparison).

Documents are packed in a fixed order (sorted ids), each followed by the tokenizer's separator,
and cut into ``--seq-len`` sequences until ``--tokens``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class EvalSet:
    """A named evaluation text: a data source and which of its documents count."""

    name: str
    source: str
    heldout_only: bool  # only documents held out in the student's training split


def default_sets(package: str = "networkx") -> list[EvalSet]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"--package {package}: not installed")
    code = f"{list(spec.submodule_search_locations)[0]}/**/*.py"
    return [EvalSet("english-news", "builtin:news", False), EvalSet("english-wiki", "builtin:wikipedia", True),
            EvalSet("python-3rd-party", code, False), EvalSet("python-stdlib", "builtin:python-stdlib", True)]


def token_batches(eval_set: EvalSet, tokenizer: Any, split: tuple[int, float, set[str]], seq_len: int,
                  tokens: int, batch_size: int) -> list[torch.Tensor]:
    """``(b, seq_len)`` batches of the set's documents, in sorted-id order, up to ``tokens`` tokens.

    ``split``: the student's (data seed, held-out fraction, trained source names).
    """
    from surgery.data import encode_texts, is_heldout, separator_id
    from surgery.data.sources import open_source
    from surgery.recipe import DataSource

    source = open_source(DataSource(source=eval_set.source))
    seed, fraction, trained = split
    keep_all = not eval_set.heldout_only or eval_set.source not in trained
    stream: list[int] = []
    sep = separator_id(tokenizer)
    need = -(-tokens // seq_len) * seq_len
    for doc_id in source.doc_ids():
        if not keep_all and not is_heldout(seed, source.split_key, doc_id, fraction):
            continue
        ids = encode_texts(tokenizer, [source.read(doc_id)], add_special_tokens=True)[0]
        stream += ids + ([sep] if sep is not None and ids[-1:] != [sep] else [])
        if len(stream) >= need:
            break
    n = min(len(stream), need) // seq_len
    if n == 0:
        raise SystemExit(f"{eval_set.name}: fewer than {seq_len} tokens to evaluate")
    seqs = torch.tensor(stream[: n * seq_len]).view(n, seq_len)
    return list(seqs.split(batch_size))


@torch.inference_mode()
def score(teacher: torch.nn.Module, student: torch.nn.Module, batches: list[torch.Tensor],
          device: torch.device) -> dict[str, float]:
    """Teacher and student perplexity on the same batches, their ratio and top-1 agreement."""
    nll = {"teacher": 0.0, "student": 0.0}
    same = count = 0
    for batch in batches:
        ids = batch.to(device)
        top = {}
        for name, model in (("teacher", teacher), ("student", student)):
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (b, L-1, V)
            nll[name] += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            top[name] = logits.argmax(-1)
        same += int((top["teacher"] == top["student"]).sum())
        count += top["teacher"].numel()
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    return {"tokens": sum(b.numel() for b in batches), "teacher_ppl": ppl["teacher"], "student_ppl": ppl["student"],
            "ratio": ppl["student"] / ppl["teacher"], "top1": same / count}


def student_split(student_dir: Path) -> tuple[int, float, set[str]]:
    """(data seed, held-out fraction, trained sources) from the student's resolved recipe."""
    from surgery.recipe import Recipe

    recipe = Recipe.load(student_dir / "recipe.resolved.yaml")
    return recipe.data_seed, recipe.data.heldout_fraction, {s.source for s in recipe.data.sources}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", help="a student directory (its teacher is loaded from its recipe)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per set")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--package", default="networkx", help="third-party package whose code is the Python set")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    import surgery
    from surgery.log import configure
    from surgery.recipe import Recipe
    from surgery.runtime import autocast, resolve_device
    from surgery.student import load_model_ref

    configure(quiet=True)
    device = resolve_device(args.device)
    student_dir = Path(args.student)
    recipe = Recipe.load(student_dir / "recipe.resolved.yaml")
    student = surgery.load(student_dir, device=device)
    teacher = load_model_ref(recipe.teacher.model, device=device)
    split = student_split(student_dir)
    rows = []
    with autocast("auto", device):
        for eval_set in default_sets(args.package):
            batches = token_batches(eval_set, teacher.tokenizer, split, args.seq_len, args.tokens, args.batch_size)
            rows.append({"set": eval_set.name, **score(teacher.model, student, batches, device)})
    print(f"# {student_dir} vs {recipe.teacher.model} on {device}; seq_len {args.seq_len}")
    print("| set | tokens | teacher ppl | student ppl | ratio | top-1 agreement |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['set']} | {r['tokens']} | {r['teacher_ppl']:.2f} | {r['student_ppl']:.2f} | {r['ratio']:.2f} | "
              f"{r['top1']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
