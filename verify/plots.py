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


class MaxNLocator:  # resolved lazily so importing this module does not import matplotlib
    def __new__(cls, **kwargs: Any) -> Any:
        from matplotlib.ticker import MaxNLocator as _Locator

        return _Locator(**kwargs)


def _layer(path: str) -> int:
    nums = [int(p) for p in path.split(".") if p.isdigit()]
    return nums[-1] if nums else 0


PANELS = {
    "stage1": "stage 1: Frobenius distance to teacher attention",
    "stage2": "stage 2: per-token L2 distance to teacher block",
}


def plot_per_layer(series: dict[str, dict[str, dict[str, float | None]]], path: str | Path) -> Path | None:
    """Per-layer distances: ``series[panel][label][module path] = value`` with panels ``stage1``/``stage2``.

    E.g. ``{"stage1": {"before": {...}, "after": {...}}, "stage2": {...}}`` for ``surgery apply``.
    """
    panels = [(key, lines) for key, lines in series.items() if any(lines.values())]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for ax, (key, lines) in zip(axes[0], panels):
        for i, (label, values) in enumerate(lines.items()):
            items = sorted(values.items(), key=lambda kv: _layer(kv[0]))
            ys = [v if v is not None else math.nan for _, v in items]
            ax.plot([_layer(k) for k, _ in items], ys, "o--" if i == 0 and len(lines) > 1 else "o-", label=label,
                    markersize=3)
        ax.set_title(PANELS.get(key, key), fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def before_after_series(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """The per-layer series of an apply report (before and after each stage)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for stage, key in (("stage1", "per_node"), ("stage2", "per_block")):
        entries = report[stage][key]
        out[stage] = {which: {p: v[which] for p, v in entries.items()} for which in ("before", "after")}
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
