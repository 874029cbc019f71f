"""The study behind ``surgery approximate``: teacher attention on held-out text, each family fitted, tables, plot.

For ``samples`` held-out sequences of ``seq_len`` tokens, the teacher runs once per sequence with its
attention ``q``/``k`` recorded (:func:`verify.capture.record_attention_qk`); the causal softmax of the
chosen heads (``heads_per_layer`` sampled per layer with ``seed``, or ``all``) gives matrices
``P (L, L)``, fitted by :func:`surgery.approximate.fit.fit_all`. The result is the mean Frobenius
distance ``||M - P||_F`` per family and rank, overall and per layer (MOHAWK Table 3, Bick et al. 2024,
arXiv 2408.10189), written as ``approximate.json``, ``approximate.md`` and ``approximate.png``.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..options import ApproximateOptions
from .fit import FAMILIES, Fit, fit_all


def parse_ranks(text: str) -> list[int]:
    """``"16,32,64"`` -> ``[16, 32, 64]`` (each positive)."""
    ranks = [int(r) for r in text.split(",") if r.strip()]
    if not ranks or any(r <= 0 for r in ranks):
        raise ValueError(f"--ranks {text!r}: give positive integers separated by commas, e.g. 16,32,64")
    return ranks


def parse_families(text: str) -> tuple[str, ...]:
    """``"all"`` or a comma list of :data:`FAMILIES`."""
    if text == "all":
        return FAMILIES
    chosen = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown or not chosen:
        raise ValueError(f"--families {text!r}: unknown {unknown}; choose from all, {', '.join(FAMILIES)}")
    return chosen


def parse_layers(text: str, n_layers: int) -> list[int]:
    """``"all"`` or a comma list of layer indices below ``n_layers``."""
    if text == "all":
        return list(range(n_layers))
    try:
        layers = [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        layers = []
    if not layers or any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"--layers {text!r}: give 'all' or layer indices 0..{n_layers - 1} separated by commas")
    return layers


def choose_heads(n_layers: int, n_heads: int, per_layer: str, seed: int) -> list[list[int]]:
    """Query heads studied in each layer: ``per_layer`` sampled without replacement (seeded), or every head."""
    if per_layer == "all":
        return [list(range(n_heads)) for _ in range(n_layers)]
    k = int(per_layer)
    if not 0 < k <= n_heads:
        raise ValueError(f"--heads-per-layer {per_layer}: give 1..{n_heads} or 'all'")
    g = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(n_heads, generator=g)[:k].tolist()) for _ in range(n_layers)]


@torch.no_grad()
def teacher_attention(teacher: torch.nn.Module, ids: torch.Tensor, heads: list[list[int]],
                      layers: list[int]) -> torch.Tensor:
    """Causal attention probabilities of the chosen heads: ids (1, L) -> P (sum of heads, L, L), float32.

    Ordered by layer, then head; computed from the recorded ``q``/``k`` (after RoPE, with the module's scale).
    """
    from rewrites.adapters import get_adapter
    from verify.capture import record_attention_qk

    from ..ops.stage1 import attention_probs

    views = get_adapter(teacher).attention_views()
    paths = [views[i].path for i in layers]
    with record_attention_qk(teacher, paths) as qk:
        teacher(input_ids=ids, use_cache=False)
    out = []
    for path, chosen in zip(paths, (heads[i] for i in layers)):
        rec = qk[path]
        if not rec.plain:
            raise ValueError(f"{path}: the teacher attention is not a plain causal softmax ({rec.why})")
        group = rec.q.shape[1] // rec.k.shape[1]
        for h in chosen:
            q = rec.q[:, h : h + 1]  # (1, 1, L, d)
            k = rec.k[:, h // group : h // group + 1]
            out.append(attention_probs(q, k, rec.scale)[0, 0].float())  # (L, L)
    return torch.stack(out)


def heldout_sequences(tokenizer: Any, opts: ApproximateOptions) -> torch.Tensor:
    """``(samples, seq_len)`` held-out token ids (the eval split of :func:`surgery.evaluate.heldout_for_eval`)."""
    from ..evaluate import heldout_for_eval
    from ..options import EvalOptions

    eval_opts = EvalOptions(data=opts.data, tokens=opts.samples * opts.seq_len, seq_len=opts.seq_len, batch_size=1)
    batches, _ = heldout_for_eval(tokenizer, eval_opts)
    ids = torch.cat(batches)[: opts.samples]
    if ids.shape[0] < opts.samples:
        raise ValueError(f"--data {opts.data} has only {ids.shape[0]} held-out sequences of {opts.seq_len} tokens")
    return ids


def run_study(opts: ApproximateOptions, progress: bool = True) -> dict[str, Any]:
    """Load the teacher, capture its attention, fit every family; returns the result dict (see :func:`write`)."""
    from ..teacher import load_teacher

    torch.manual_seed(opts.seed)
    ranks, families = parse_ranks(opts.ranks), parse_families(opts.families)
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if opts.device == "auto" else opts.device))
    start = time.perf_counter()
    teacher = load_teacher(opts.teacher, device=device, dtype=torch.float32, progress=progress)
    model = teacher.model.eval()
    cfg = model.config.get_text_config(decoder=True)
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    layers = parse_layers(opts.layers, n_layers)
    heads = choose_heads(n_layers, n_heads, opts.heads_per_layer, opts.seed)
    ids = heldout_sequences(teacher.tokenizer, opts)
    dtype = torch.float64 if opts.float64 else torch.float32
    labels = [(layer, h) for layer in layers for h in heads[layer]]
    per: dict[str, list[float]] = {}  # "family@rank" -> distance per (sample, layer, head)
    bar = _bar(progress, len(ids))
    group = opts.samples_per_fit or (len(ids) if device.type == "cuda" else 1)
    for batch in ids.split(group):  # sample-major order: the (sample, layer-head) layout summarise expects
        P = torch.cat([teacher_attention(model, s[None].to(device), heads, layers) for s in batch]).to(dtype)  # (S*N, L, L)
        for fit in fit_all(P, ranks, families, steps=opts.steps, lr=opts.lr):
            per.setdefault(_key(fit), []).extend(fit.distance.tolist())
        bar.update(len(batch))
    bar.close()
    return summarise(per, labels, len(ids), {
        **opts.model_dump(), "ranks": ranks, "families": list(families), "layers": layers,
        "heads": {str(layer): heads[layer] for layer in layers}, "device": str(device),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.perf_counter() - start, 1),
    })


def _key(fit: Fit) -> str:
    return fit.family if fit.rank is None else f"{fit.family}@{fit.rank}"


def _bar(progress: bool, total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="approximate", unit="sequence", disable=not progress)


def summarise(per: dict[str, list[float]], labels: list[tuple[int, int]], samples: int,
              setup: dict[str, Any]) -> dict[str, Any]:
    """Mean distance per family@rank, overall and per layer (over samples and the layer's heads)."""
    per_layer: dict[str, dict[str, float]] = {}
    mean: dict[str, float] = {}
    for key, values in per.items():
        d = torch.tensor(values).reshape(samples, len(labels))  # (samples, layer-heads)
        mean[key] = d.mean().item()
        layers: dict[str, list[float]] = {}
        for j, (layer, _) in enumerate(labels):
            layers.setdefault(str(layer), []).extend(d[:, j].tolist())
        per_layer[key] = {layer: sum(v) / len(v) for layer, v in layers.items()}
    return {"setup": setup, "mean": mean, "per_layer": per_layer, "matrices": samples * len(labels)}


def markdown(result: dict[str, Any]) -> str:
    """The tables: mean distance per family x rank, then per layer at each rank."""
    s = result["setup"]
    ranks = s["ranks"]
    fams = s["families"]
    lines = [
        f"Mean Frobenius distance ||M - P||_F of the best approximation of {result['matrices']} attention matrices "
        f"({s['teacher']}, {s['samples']} held-out sequence(s) of {s['seq_len']} tokens from {s['data']}, "
        f"heads per layer: {s['heads_per_layer']}, {s['steps']} Adam steps per fit; lower is better).",
        "",
        "| family | " + " | ".join(f"rank/state {r}" for r in ranks) + " |",
        "| --- | " + " | ".join("---" for _ in ranks) + " |",
    ]
    for fam in fams:
        cells = [f"{result['mean'][fam]:.4g}"] * len(ranks) if fam == "toeplitz" else [
            f"{result['mean'][f'{fam}@{r}']:.4g}" for r in ranks]
        lines.append(f"| {fam}{' (no rank)' if fam == 'toeplitz' else ''} | " + " | ".join(cells) + " |")
    for r in ranks:
        keys = [fam if fam == "toeplitz" else f"{fam}@{r}" for fam in fams]
        lines += ["", f"Per layer, rank/state {r}:", "", "| layer | " + " | ".join(fams) + " |",
                  "| --- | " + " | ".join("---" for _ in fams) + " |"]
        for layer in s["layers"]:
            lines.append(f"| {layer} | " + " | ".join(f"{result['per_layer'][k][str(layer)]:.4g}" for k in keys) + " |")
    lines += ["", f"Machine: {s['machine']} ({s['device']}); {s['date']}; {s['seconds']} s."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Left: mean distance against rank per family; right: per layer at the middle rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    s = result["setup"]
    ranks, fams, layers = s["ranks"], s["families"], s["layers"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    mid = ranks[len(ranks) // 2]
    for fam in fams:
        if fam == "toeplitz":
            left.axhline(result["mean"][fam], linestyle="--", color="gray", label="toeplitz")
            right.plot(layers, [result["per_layer"][fam][str(i)] for i in layers], "--", color="gray", label=fam)
            continue
        left.plot(ranks, [result["mean"][f"{fam}@{r}"] for r in ranks], "o-", label=fam)
        right.plot(layers, [result["per_layer"][f"{fam}@{mid}"][str(i)] for i in layers], ".-", label=fam)
    left.set(xscale="log", yscale="log", xlabel="rank / state size", ylabel="mean ||M - P||_F", title="by rank")
    left.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    left.set_xticks(ranks, [str(r) for r in ranks])
    right.set(yscale="log", xlabel="layer", ylabel="mean ||M - P||_F", title=f"by layer (rank/state {mid})")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Structured approximations of {s['teacher']} attention (MOHAWK Table 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """``approximate.json``, ``approximate.md`` and ``approximate.png`` in ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "approximate.json", "md": out / "approximate.md", "png": out / "approximate.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths
