"""MOHAWK Table 2: which stages a fixed token budget goes through, scored on held-out text.

    python bench/stages.py --recipe recipes/smollm2_mamba_gpu.yaml --total-tokens 2424832 \\
        --quality-tokens 16384 --out runs/stages-gpu           # one H200: ~2 min per column
    python bench/stages.py --plot-only --out runs/stages-gpu    # redraw the plot from the saved rows

Columns (Bick et al. 2024, arXiv 2408.10189, Table 2: stage 2 only 53.3, stage 3 only 54.5, stages
2-3 62.3, stages 1-3 62.7 average accuracy): ``1-3``, ``2-3``, ``3``, ``2``. Every column spends the
same total number of training tokens (``--total-tokens``), split among its enabled stages in the
proportions of the recipe's own stage budgets (rounded to whole optimizer steps), so a column
without stage 1 gives stage 1's tokens to the stages it keeps. Per-token cost is close across stages
(docs/benchmarks.md, bench/train.py), so equal tokens are close to equal compute. Each column is a
``surgery apply`` of the recipe with overrides (bench/variants.py), then bench/quality.py's held-out
sets; rows accumulate in ``OUT/stages.json`` and the plot goes to ``OUT/stages.png``.
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
    load_rows,
    run_all,
)

COLUMNS = {"1-3": (1, 2, 3), "2-3": (2, 3), "3": (3,), "2": (2,)}


def split_budget(total: int, recipe_tokens: dict[int, int], stages: tuple[int, ...], step: int) -> dict[int, int]:
    """``total`` tokens over ``stages`` in proportion to ``recipe_tokens``, whole ``step``s each, summing to ``total``.

    The last stage takes what rounding leaves, so every column trains on exactly the same tokens.
    """
    if total % step or total < step * len(stages):
        raise ValueError(f"--total-tokens {total} must be a multiple of tokens_per_step {step}, "
                         f"at least one step per stage ({step * len(stages)})")
    weight = sum(recipe_tokens[s] for s in stages)
    steps = total // step
    out = {s: max(1, round(steps * recipe_tokens[s] / weight)) * step for s in stages[:-1]}
    out[stages[-1]] = total - sum(out.values())
    if out[stages[-1]] < step:
        raise ValueError(f"--total-tokens {total} is too small to give every stage of {stages} a step")
    return out


def variants(recipe_path: Path, total: int, columns: list[str], verify_tokens: int,
             common: list[str] = ()) -> list[Variant]:
    """One variant per column; the split follows the recipe as the ``common`` overrides leave it."""
    from surgery.recipe import Recipe

    recipe = Recipe.load(recipe_path, list(common))
    recipe_tokens = {i: recipe.stage(i).tokens for i in (1, 2, 3)}
    steps = {recipe.stage(i).tokens_per_step for i in (1, 2, 3)}
    if len(steps) != 1:
        raise ValueError(f"the recipe's stages use different tokens_per_step {sorted(steps)}: give them one")
    out = []
    for name in columns:
        budget = split_budget(total, recipe_tokens, COLUMNS[name], next(iter(steps)))
        o = [f"verify.tokens={verify_tokens}"]
        for i in (1, 2, 3):
            o += [f"stages.stage{i}.tokens={budget[i]}"] if i in budget else [f"stages.stage{i}.enabled=false"]
        out.append(Variant(name, tuple(o)))
    return out


def _tokens(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def table(rows: dict) -> str:
    sets = held_out_columns(rows)
    lines = ["| stages | tokens 1 / 2 / 3 | recipe held-out ppl | top-1 agreement | "
             + " | ".join(f"{s} ratio (top-1)" for s in sets) + (" | " if sets else "") + "apply seconds |",
             "| " + " | ".join(["---"] * (5 + len(sets))) + " |"]
    for name, r in rows.items():
        tok = " / ".join(_tokens(r["tokens"].get(f"stage{i}", 0)) for i in (1, 2, 3))
        lines.append(f"| {name} | {tok} | {r['perplexity']['student_final']:.4g} (teacher {r['perplexity']['teacher']:.3g}) | "
                     f"{final_agreement(r):.3f} | " + "".join(c + " | " for c in held_out_cells(r, sets))
                     + f"{r['apply_seconds']} |")
    return "\n".join(lines) + "\n"


def plot(rows: dict, path: Path) -> None:
    """Held-out perplexity ratio per set (log scale) and top-1 agreement, one group of bars per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = held_out_columns(rows)
    names = list(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(sets))
    for k, s in enumerate(sets):
        xs = [i + k * width for i in range(len(names))]
        ax1.bar(xs, [rows[n]["held_out"][s]["ratio"] for n in names], width, label=s)
        ax2.bar(xs, [rows[n]["held_out"][s]["top1"] for n in names], width, label=s)
    for ax, title in ((ax1, "student / teacher perplexity (lower is better)"), (ax2, "top-1 agreement (higher is better)")):
        ax.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(names))], [f"stages {n}" for n in names])
        ax.set_title(title)
    ax1.set_yscale("log")
    ax1.axhline(1.0, color="black", linewidth=0.8)
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(sets), fontsize=9)
    fig.suptitle("MOHAWK Table 2 on SmolLM2-135M: the same token budget through different stages")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--columns", default=",".join(COLUMNS), help="comma list of " + ", ".join(COLUMNS))
    p.add_argument("--total-tokens", type=int, default=32768, help="training tokens of every column, all stages together")
    add_common_arguments(p)
    p.add_argument("--out", default="runs/stages", help="directory for one student per column and stages.{json,md,png}")
    p.add_argument("--plot-only", action="store_true", help="redraw the table and plot from OUT/stages.json")
    args = p.parse_args()

    out = ROOT / args.out
    saved = out / "stages.json"
    if args.plot_only:
        rows = load_rows(saved)
    else:
        chosen = variants(ROOT / args.recipe, args.total_tokens, args.columns.split(","), args.verify_tokens, args.common)
        rows = run_all(ROOT / args.recipe, chosen, saved, vars(args), args.quality_tokens, args.seq_len,
                   args.common)
    text = table(rows)
    (out / "stages.md").write_text(text)
    print(text)
    if held_out_columns(rows):
        try:
            plot(rows, out / "stages.png")
        except ImportError as e:  # the GPU machine has no matplotlib: redraw with --plot-only where it is
            print(f"no plot ({e}); run with --plot-only where matplotlib is installed")


if __name__ == "__main__":
    main()
