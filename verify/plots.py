"""PNG plots for reports: per-layer distances before/after each stage, loss curves per stage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer(path: str) -> int:
    nums = [int(p) for p in path.split(".") if p.isdigit()]
    return nums[-1] if nums else 0


def plot_per_layer(report: dict[str, Any], path: str | Path) -> Path | None:
    """Stage-1 and stage-2 distance per layer, before and after their stage."""
    panels = [("stage1", "per_node", "stage 1: Frobenius distance to teacher attention"),
              ("stage2", "per_block", "stage 2: per-token L2 distance to teacher block")]
    panels = [p for p in panels if report[p[0]][p[1]]]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for ax, (stage, key, title) in zip(axes[0], panels):
        items = sorted(report[stage][key].items(), key=lambda kv: _layer(kv[0]))
        layers = [_layer(k) for k, _ in items]
        for which, style in (("before", "o--"), ("after", "o-")):
            values = [v[which] if v[which] is not None else math.nan for _, v in items]
            ax.plot(layers, values, style, label=which, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Training loss against tokens, one panel per stage that ran."""
    stages = sorted({r["stage"] for r in records})
    if not stages:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.4), squeeze=False)
    labels = {1: "Frobenius", 2: "L2", 3: "KD loss"}
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in records if r["stage"] == stage]
        ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], "-", linewidth=1.2)
        ax.set_title(f"stage {stage} ({labels.get(stage, 'loss')})", fontsize=10)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
