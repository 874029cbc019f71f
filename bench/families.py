"""MOHAWK Table 4: the same distillation with each mixer family, side by side, scored on held-out text.

    python bench/families.py                                   # SmolLM2-135M, stages 1+2, 2-core CPU sized
    python bench/families.py --recipe recipes/smollm2_mamba_gpu.yaml --no-stage1 \\
        --tokens 524288 --stage3-tokens 1572864 --out runs/families-gpu     # on a GPU: stages 2+3, like the paper

Each family replaces every attention layer of ``--recipe`` (same data, seed, budget, ``v_to_x`` /
``o_to_out`` transfers; ``q_to_C`` / ``k_to_B`` off, so stage 1 learns B, C and the decay from
scratch) at rank / state ``--state``; the table gives the stage-1 (Frobenius, per head) and stage-2
(per-token L2, per block) distances, the recipe's held-out perplexity and top-1 agreement, and the
perplexity ratio to the teacher on ``bench/quality.py``'s held-out sets. Rows accumulate in
``OUT/families.json`` across invocations with the same ``--out`` (bench/variants.py). Bick et al.
2024 (arXiv 2408.10189) Table 4 reports the stage-2 distance after stages 2+3 with 1B tokens each
(Toeplitz 9.6 > low-rank 7.6 > SSD 5.5).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from variants import (
    ROOT,
    Variant,
    add_common_arguments,
    final_agreement,
    held_out_cells,
    held_out_columns,
    run_all,
)

TRANSFER = "{v_to_x: true, o_to_out: true}"  # the recipes' weight transfer; only the SSD form has a skip D
FAMILIES = {  # family -> (mixer, params, init): init replaces the recipe's, whose keys are the recipe mixer's
    "toeplitz": ("toeplitz", "{{kernel_size: {kernel}}}", TRANSFER),
    "low_rank": ("low_rank", "{{rank: {state}, chunk_size: 64}}", TRANSFER),
    "ssd": ("discrete_mamba2", "{{d_state: {state}, chunk_size: 64, d_conv: 0}}", "{v_to_x: true, o_to_out: true, D: 0.0}"),
    "semiseparable": ("semiseparable", "{{d_state: {state}, chunk_size: 16}}", TRANSFER),
}


def variants(families: list[str], state: int, kernel: int, tokens: int, stage3_tokens: int, stage1: bool,
             verify_tokens: int) -> list[Variant]:
    """One variant per family: the mixer, its params and the shared budgets as recipe overrides."""
    out = []
    for fam in families:
        mixer, params, init = FAMILIES[fam]
        o = [f"replace.0.mixer={mixer}", f"replace.0.params={params.format(state=state, kernel=kernel)}",
             f"replace.0.init={init}",
             f"stages.stage2.tokens={tokens}", f"verify.tokens={verify_tokens}"]
        o += [f"stages.stage1.tokens={tokens}"] if stage1 else ["stages.stage1.enabled=false"]
        o += [f"stages.stage3.tokens={stage3_tokens}"] if stage3_tokens else ["stages.stage3.enabled=false"]
        out.append(Variant(fam, tuple(o)))
    return out


def table(rows: dict) -> str:
    sets = held_out_columns(rows)
    teacher = next(iter(rows.values()))["perplexity"]["teacher"]
    lines = [
        "| family (mixer) | stage 1 before → after | stage 2 before → after | perplexity (teacher "
        f"{teacher:.3g}) | top-1 agreement | " + " | ".join(f"{s} ratio (top-1)" for s in sets) + (" | " if sets else "")
        + "apply seconds |",
        "| " + " | ".join(["---"] * (6 + len(sets))) + " |",
    ]
    for fam, r in rows.items():
        s1 = f"{r['stage1']['before']:.4g} → {r['stage1']['after']:.4g}" if r["stage1"].get("after") is not None else "off"
        mixer = r["overrides"][0].split("=", 1)[1]
        lines.append(f"| {fam} (`{mixer}`) | {s1} | {r['stage2']['before']:.4g} → {r['stage2']['after']:.4g} | "
                     f"{r['perplexity']['student_final']:.4g} | {final_agreement(r):.3f} | "
                     + "".join(c + " | " for c in held_out_cells(r, sets)) + f"{r['apply_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma list of " + ", ".join(FAMILIES))
    p.add_argument("--state", type=int, default=32, help="rank / state size of every family but Toeplitz")
    p.add_argument("--kernel", type=int, default=256, help="Toeplitz kernel length (the CPU recipe's sequence length)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of stage 1 and of stage 2 each")
    p.add_argument("--no-stage1", dest="stage1", action="store_false", help="stages 2+3 only, as in the paper's Table 4")
    p.add_argument("--stage3-tokens", type=int, default=0, help="tokens of stage 3 (0: stage 3 off)")
    add_common_arguments(p)
    p.add_argument("--out", default="runs/families", help="directory for one student per family and families.{json,md}")
    args = p.parse_args()

    out = ROOT / args.out
    chosen = variants(args.families.split(","), args.state, args.kernel, args.tokens, args.stage3_tokens, args.stage1,
                      args.verify_tokens)
    rows = run_all(ROOT / args.recipe, chosen, out / "families.json", vars(args), args.quality_tokens, args.seq_len,
                   args.common)
    text = table(rows)
    (out / "families.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
