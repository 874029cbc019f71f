"""One recipe under several named sets of overrides, in one process, each student scored on held-out text.

The shared engine of ``bench/families.py`` (MOHAWK Table 4: one mixer family per variant) and
``bench/stages.py`` (Table 2: which stages run). Each variant is an ordinary ``surgery apply`` of the
recipe with its overrides (the same runner, report and student directory as the CLI), followed by
``bench/quality.py``'s held-out sets (news never trained on, held-out Wikipedia and standard-library
files, third-party Python) scored by teacher and student on the same tokens.

Rows accumulate in ``OUT/NAME.json`` across invocations with the same ``--out`` (a variant run again
replaces its row), so variants can be run one device call at a time.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


@dataclass(frozen=True)
class Variant:
    """A named set of recipe overrides (``key=value`` strings, as on the ``surgery apply`` command line)."""

    name: str
    overrides: tuple[str, ...]


def load_rows(path: Path) -> dict[str, Any]:
    """The rows an earlier invocation saved at ``path`` (empty when there is none)."""
    return json.loads(path.read_text())["rows"] if path.is_file() else {}


def run_variant(recipe: Path, variant: Variant, out: Path, quality_tokens: int, seq_len: int,
                common: list[str] = ()) -> dict[str, Any]:
    """Apply the recipe with ``common`` then the variant's overrides into ``out/NAME``; its report and held-out quality."""
    import quality
    from surgery.log import configure
    from surgery.options import ApplyOptions
    from surgery.pipeline import apply
    from surgery.recipe import Recipe

    overrides = [*common, *variant.overrides, f"output.dir={out / variant.name}"]
    start = time.perf_counter()
    path = apply(Recipe.load(recipe, overrides), ApplyOptions(overwrite=True, restart=True))
    seconds = time.perf_counter() - start
    report = json.loads((path / "report.json").read_text())
    held_out = quality.main([str(path), "--tokens", str(quality_tokens), "--seq-len", str(seq_len)]) if quality_tokens else []
    configure()  # bench/quality.py silences progress; the next variant's stages show theirs again
    return {
        "overrides": list(variant.overrides), "common": list(common),
        "tokens": report.get("tokens", {}),
        "stage1": report["stage1"]["mean"], "stage2": report["stage2"]["mean"], "stage3": report["stage3"]["kl"],
        "perplexity": report["perplexity"], "top1_agreement": report["top1_agreement"],
        "held_out": {r["set"]: r for r in held_out},
        "apply_seconds": round(seconds, 1),
    }


def run_all(recipe: Path, variants: list[Variant], saved: Path, args: dict[str, Any], quality_tokens: int,
            seq_len: int, common: list[str] = ()) -> dict[str, Any]:
    """Run every variant, saving the rows after each one (a cut-off call keeps the finished rows).

    ``common`` overrides go to every variant first (e.g. ``data.max_tokens=...``, shared by all).
    """
    rows = load_rows(saved)
    saved.parent.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        rows[variant.name] = run_variant(recipe, variant, saved.parent, quality_tokens, seq_len, list(common))
        saved.write_text(json.dumps({"args": args, "rows": rows}, indent=2) + "\n")
        print(variant.name, json.dumps(rows[variant.name]), flush=True)
    return rows


def held_out_columns(rows: dict[str, Any]) -> list[str]:
    """The held-out set names, in the order the first row that has them lists them."""
    for row in rows.values():
        if row.get("held_out"):
            return list(row["held_out"])
    return []


def held_out_cells(row: dict[str, Any], sets: list[str]) -> list[str]:
    """``ratio (top-1)`` per held-out set, ``n/a`` where the row has none."""
    cells = []
    for name in sets:
        r = row.get("held_out", {}).get(name)
        cells.append(f"{r['ratio']:.2f} ({r['top1']:.3f})" if r else "n/a")
    return cells


def final_agreement(row: dict[str, Any]) -> float:
    agree = row["top1_agreement"]
    return agree.get("student_final", agree) if isinstance(agree, dict) else agree


def add_common_arguments(p: Any) -> None:
    """The options every variant bench shares: the recipe, held-out scoring, overrides for all variants."""
    p.add_argument("--recipe", default="recipes/smollm2_mamba.yaml", help="the recipe every variant runs")
    p.add_argument("--verify-tokens", type=int, default=1024, help="held-out tokens of the report's measurements")
    p.add_argument("--quality-tokens", type=int, default=0, help="tokens per bench/quality.py set (0: skip)")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length of the bench/quality.py sets")
    p.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every variant (repeatable), e.g. --set data.max_tokens=2000000")
