"""MOHAWK Table 4 in small: the same short distillation with each mixer family, side by side.

    python bench/families.py                                   # SmolLM2-135M, stages 1+2, 2-core CPU sized
    python bench/families.py --tokens 65536 --stage3-tokens 65536 --out runs/families-gpu   # on a GPU

Rows accumulate in ``OUT/families.json`` across invocations with the same ``--out`` (a family run again
replaces its row), so families can be run one at a time. Each family replaces every attention layer of ``recipes/smollm2_mamba.yaml`` (same data, seed, budget,
``v_to_x`` / ``o_to_out`` transfers; ``q_to_C`` / ``k_to_B`` off, so stage 1 learns B, C and the decay
from scratch) at rank / state ``--state``; the table gives the stage-1 (Frobenius, per head) and stage-2
(per-token L2, per block) distances after the budget, held-out perplexity and top-1 agreement with the
teacher. Bick et al. 2024 (arXiv 2408.10189) Table 4 reports the stage-2 distance after stages 2+3
(Toeplitz 9.6 > low-rank 7.6 > SSD 5.5).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = {  # family -> (mixer, params)
    "toeplitz": ("toeplitz", "{{kernel_size: 256}}"),
    "low_rank": ("low_rank", "{{rank: {state}, chunk_size: 64}}"),
    "ssd": ("discrete_mamba2", "{{d_state: {state}, chunk_size: 64, d_conv: 0}}"),
    "semiseparable": ("semiseparable", "{{d_state: {state}, chunk_size: 16}}"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma list of " + ", ".join(FAMILIES))
    p.add_argument("--state", type=int, default=32, help="rank / state size of every family but Toeplitz")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of stage 1 and of stage 2 each")
    p.add_argument("--stage3-tokens", type=int, default=0, help="tokens of stage 3 (0: stage 3 off)")
    p.add_argument("--verify-tokens", type=int, default=1024, help="held-out tokens of the measurements")
    p.add_argument("--out", default="runs/families", help="directory for one student per family and families.{json,md}")
    args = p.parse_args()

    from surgery.options import ApplyOptions
    from surgery.pipeline import apply
    from surgery.recipe import Recipe

    out = ROOT / args.out
    saved = out / "families.json"
    rows = json.loads(saved.read_text())["rows"] if saved.is_file() else {}  # earlier families of the same --out
    for fam in args.families.split(","):
        mixer, params = FAMILIES[fam]
        overrides = [
            f"replace.0.mixer={mixer}", f"replace.0.params={params.format(state=args.state)}",
            f"stages.stage1.tokens={args.tokens}", f"stages.stage2.tokens={args.tokens}",
            f"verify.tokens={args.verify_tokens}", f"output.dir={out / fam}",
        ]
        overrides += [f"stages.stage3.tokens={args.stage3_tokens}"] if args.stage3_tokens else ["stages.stage3.enabled=false"]
        start = time.perf_counter()
        path = apply(Recipe.load(ROOT / "recipes" / "smollm2_mamba.yaml", overrides), ApplyOptions(overwrite=True, restart=True))
        report = json.loads((path / "report.json").read_text())
        rows[fam] = {
            "mixer": mixer, "stage1": report["stage1"]["mean"], "stage2": report["stage2"]["mean"],
            "perplexity": report["perplexity"], "top1_agreement": report["top1_agreement"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(fam, json.dumps(rows[fam]), flush=True)
    lines = [
        f"| family (mixer) | stage 1 before → after | stage 2 before → after | perplexity (teacher {next(iter(rows.values()))['perplexity']['teacher']:.3g}) | top-1 agreement | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for fam, r in rows.items():
        ppl = r["perplexity"]["student_final"]
        agree = r["top1_agreement"]
        agree = agree.get("student_final", agree) if isinstance(agree, dict) else agree
        lines.append(f"| {fam} (`{r['mixer']}`) | {r['stage1']['before']:.4g} → {r['stage1']['after']:.4g} | "
                     f"{r['stage2']['before']:.4g} → {r['stage2']['after']:.4g} | {ppl:.4g} | {agree if isinstance(agree, str) else f'{agree:.3f}'} | {r['seconds']} |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "families.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    (out / "families.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
