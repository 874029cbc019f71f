"""HTML rendering of a :class:`~surgery.graph_diff.Diff`: one self-contained page.

Inline CSS and SVG only (no scripts, fonts or images from anywhere): a summary,
a strip of every block coloured by what happened to it (each links to its
group), teacher-vs-student block graphs for each group of identically changed
blocks with the replaced node highlighted and its tensors listed with their
transfer sources, a parameter composition chart and a per-node table.

The block graph layout is a small layered DAG drawing: ranks by longest path
(side inputs pulled down next to their consumer), the residual stream as a
vertical spine, side branches to its right, long skip edges bowed to its left.
"""

from __future__ import annotations

import html
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import networkx as nx

from .graph_diff import BlockDiff, group_label, layer_ranges, relative_transfer

if TYPE_CHECKING:
    from .graph_diff import Diff, NodeChange
    from .graph import BlockGraph, ModelGraph

# (stroke, fill) per node kind / state
KIND_STYLE: dict[str, tuple[str, str]] = {
    "attention": ("#2563eb", "#eff6ff"),
    "mixer": ("#ea580c", "#fff7ed"),
    "removed": ("#dc2626", "#fef2f2"),
    "norm": ("#7c3aed", "#f5f3ff"),
    "mlp": ("#059669", "#ecfdf5"),
    "dropout": ("#64748b", "#f8fafc"),
    "module": ("#64748b", "#f8fafc"),
    "function": ("#94a3b8", "#f1f5f9"),
    "input": ("#334155", "#e2e8f0"),
    "output": ("#334155", "#e2e8f0"),
}
STATUS_COLOR = {"replaced": "#ea580c", "kept": "#2563eb", "unchanged": "#94a3b8", "changed": "#db2777"}
STATUS_TEXT = {"replaced": "replaced", "kept": "kept (rule)", "unchanged": "unchanged", "changed": "changed"}
SYMBOLS = {"add": "+", "iadd": "+", "mul": "×", "imul": "×", "sub": "−", "truediv": "÷", "cat": "cat", "dropout": "drop"}

MODULE_W, MODULE_H = 184, 40
ROW_H = 66
GAP = 22


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _n(x: int) -> str:
    if x >= 1_000_000_000:
        return f"{x / 1e9:.2f}B"
    if x >= 1_000_000:
        return f"{x / 1e6:.2f}M"
    if x >= 10_000:
        return f"{x / 1e3:.1f}k"
    return f"{x:,}"


# --------------------------------------------------------------------------- block graph layout


SHAPE_OPS = ("size", "getattr", "dim")  # shape bookkeeping, not data flow: left out of drawings
SHORT_INPUT = {"attention_mask": "mask", "position_ids": "positions", "cos": "cos", "sin": "sin"}


def _trim(g: nx.DiGraph, block_path: str) -> nx.DiGraph:
    """Drop shape queries (``size``, ``getattr``) and nodes whose value nobody reads; merge side inputs.

    The inputs other than ``hidden_states`` (mask, positions, RoPE tables) become
    one ``context`` node (``side=True``) drawn beside its consumers.
    """
    g = g.copy()
    g.remove_nodes_from([k for k in g if g.nodes[k]["op"] in ("call_method", "call_function") and g.nodes[k]["target"] in SHAPE_OPS])
    while True:
        dead = [k for k in g if g.out_degree(k) == 0 and g.nodes[k].get("kind") != "output"]
        if not dead:
            break
        g.remove_nodes_from(dead)
    entry = f"{block_path}::in:hidden_states"
    side = [k for k in g if g.nodes[k].get("kind") == "input" and k != entry]
    if side:
        ctx = f"{block_path}::context"
        label = " · ".join(SHORT_INPUT.get(g.nodes[k]["label"], g.nodes[k]["label"]) for k in side)
        g.add_node(ctx, op="placeholder", target="context", module_class=None, params=0, kind="input", label=label, side=True)
        for k in side:
            for s in g.successors(k):
                g.add_edge(ctx, s)
        g.remove_nodes_from(side)
    return g


def _size(g: nx.DiGraph, k: str) -> tuple[float, float]:
    a = g.nodes[k]
    if a["op"] == "call_module":
        return MODULE_W, MODULE_H
    if a["kind"] in ("input", "output"):
        return max(64.0, 7.2 * len(a["label"]) + 22), 26.0
    label = _fn_label(g, k)
    return (30.0, 30.0) if len(label) <= 3 else (7.4 * len(label) + 16, 26.0)  # a circle, or a pill


def _fn_label(g: nx.DiGraph, k: str) -> str:
    """'+' for add, '[0]' for getitem, the op name otherwise."""
    op = str(g.nodes[k]["target"])
    if op in SYMBOLS:
        return SYMBOLS[op]
    if op == "getitem":
        return k[k.rfind("[") :].split("#")[0] if "[" in k else "[·]"
    return op if len(op) <= 12 else op[:11] + "…"


def layout(g: nx.DiGraph, block_path: str) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Positions (centre x, centre y) of every node, and the drawing's width and height."""
    order = list(nx.topological_sort(g))
    rank: dict[str, int] = {}
    for k in order:
        preds = list(g.predecessors(k))
        rank[k] = max((rank[p] + 1 for p in preds), default=0)
    entry = f"{block_path}::in:hidden_states"
    for k in order:  # side inputs sit beside their first consumer, other sources just above it
        if g.in_degree(k) == 0 and k != entry and g.out_degree(k):
            first = min(rank[s] for s in g.successors(k))
            rank[k] = first if g.nodes[k].get("side") else max(0, first - 1)
    # the spine: longest path from the hidden-state input to the output
    exit_ = f"{block_path}::out"
    spine: list[str] = []
    if entry in g and exit_ in g and nx.has_path(g, entry, exit_):
        dist = {entry: 0}
        prev: dict[str, str] = {}
        for k in order:
            if k not in dist:
                continue
            for s in g.successors(k):
                if dist.get(s, -1) < dist[k] + 1:
                    dist[s], prev[s] = dist[k] + 1, k
        k = exit_
        spine = [k]
        while k in prev:
            k = prev[k]
            spine.append(k)
    on_spine = set(spine)
    by_rank: dict[int, list[str]] = defaultdict(list)
    for k in order:
        by_rank[rank[k]].append(k)

    spine_x = 24 + 120 + MODULE_W / 2  # room on the left for bowed skip edges
    pos: dict[str, tuple[float, float]] = {}
    width = spine_x + MODULE_W / 2 + 40
    for r in sorted(by_rank):
        y = 28 + r * ROW_H + MODULE_H / 2
        nodes = by_rank[r]
        main = [k for k in nodes if k in on_spine]
        side = [k for k in nodes if k not in on_spine]

        def bary(k: str) -> float:
            xs = [pos[p][0] for p in g.predecessors(k) if p in pos]
            return sum(xs) / len(xs) if xs else spine_x + 1

        side.sort(key=lambda k: (not g.nodes[k].get("side"), bary(k)))  # context inputs right beside the spine
        if main:
            pos[main[0]] = (spine_x, y)
            right = spine_x + _size(g, main[0])[0] / 2
        else:
            right = spine_x - MODULE_W / 2 - GAP
        for k in side:
            w = _size(g, k)[0]
            x = right + GAP + w / 2
            pos[k] = (x, y)
            right = x + w / 2
        width = max(width, right + 40)
    height = 28 + (max(by_rank) + 1) * ROW_H if by_rank else 60
    return pos, width, height


def _edge_path(x1: float, y1: float, x2: float, y2: float, bow: float) -> str:
    if bow:
        return f"M{x1:.1f},{y1:.1f} C{x1 - bow:.1f},{y1 + 30:.1f} {x2 - bow:.1f},{y2 - 30:.1f} {x2:.1f},{y2:.1f}"
    my = (y1 + y2) / 2
    return f"M{x1:.1f},{y1:.1f} C{x1:.1f},{my:.1f} {x2:.1f},{my:.1f} {x2:.1f},{y2:.1f}"


def block_svg(block: BlockGraph, highlight: dict[str, str], title: str) -> str:
    """SVG of one block graph; ``highlight`` maps node keys to a style kind ('mixer', 'removed')."""
    g = _trim(block.to_networkx(), block.path)
    pos, width, height = layout(g, block.path)
    parts: list[str] = []
    uid = abs(hash((block.path, title))) % 10**8
    parts.append(
        f'<svg class="block" viewBox="0 0 {width:.0f} {height + 10:.0f}" style="max-width:{width:.0f}px" '
        f'role="img" aria-label="{_e(title)}">'
        f'<defs><marker id="a{uid}" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" '
        f'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" fill="#94a3b8"/></marker></defs>'
    )
    spine_x = min((x for x, _ in pos.values()), default=0)
    for a, b in g.edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        h1, h2 = _size(g, a)[1], _size(g, b)[1]
        span = round((y2 - y1) / ROW_H)
        if span == 0:  # a side input into its neighbour on the same row: horizontal, into the right edge
            w2 = _size(g, b)[0]
            x1s, x2e = x1 - _size(g, a)[0] / 2, x2 + w2 / 2 + 2
            parts.append(
                f'<path d="M{x1s:.1f},{y1:.1f} L{x2e:.1f},{y2:.1f}" fill="none" stroke="#cbd5e1" '
                f'stroke-width="1.4" marker-end="url(#a{uid})"/>'
            )
            continue
        bow = 0.0
        if span > 1 and abs(x1 - x2) < 1 and x1 <= spine_x + MODULE_W:
            bow = 50 + 12 * min(span, 6)
        stroke = "#cbd5e1" if g.nodes[a]["kind"] == "input" and a.endswith(("mask", "ids", "cos", "sin")) else "#94a3b8"
        parts.append(
            f'<path d="{_edge_path(x1, y1 + h1 / 2, x2, y2 - h2 / 2 - 2, bow)}" fill="none" stroke="{stroke}" '
            f'stroke-width="1.4" marker-end="url(#a{uid})"/>'
        )
    for k in g:
        a = g.nodes[k]
        x, y = pos[k]
        w, h = _size(g, k)
        kind = highlight.get(k, a["kind"])
        stroke, fill = KIND_STYLE.get(kind, KIND_STYLE["module"])
        tip = f"{k}\n{a['module_class'] or a['target']}" + (f"\n{a['params']:,} parameters" if a["params"] else "")
        parts.append(f"<g><title>{_e(tip)}</title>")
        if a["op"] == "call_module":
            thick = 2.6 if k in highlight else 1.3
            dash = ' stroke-dasharray="5 3"' if kind == "removed" else ""
            parts.append(
                f'<rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w}" height="{h}" rx="8" fill="{fill}" '
                f'stroke="{stroke}" stroke-width="{thick}"{dash}/>'
            )
            name = a["label"] if len(a["label"]) <= 24 else "…" + a["label"][-23:]
            cls = a["module_class"] or ""
            cls = cls if len(cls) <= 22 else cls[:21] + "…"
            parts.append(f'<text x="{x:.1f}" y="{y - 3:.1f}" class="n1">{_e(name)}</text>')
            sub = cls + (f" · {_n(a['params'])}" if a["params"] else "")
            parts.append(f'<text x="{x:.1f}" y="{y + 12:.1f}" class="n2" fill="{stroke}">{_e(sub)}</text>')
            if k in highlight:
                badge = "NEW" if kind == "mixer" else "OUT"
                parts.append(
                    f'<rect x="{x + w / 2 - 34:.1f}" y="{y - h / 2 - 8:.1f}" width="34" height="15" rx="7" fill="{stroke}"/>'
                    f'<text x="{x + w / 2 - 17:.1f}" y="{y - h / 2 + 3:.1f}" class="badge">{badge}</text>'
                )
        elif a["kind"] in ("input", "output"):
            parts.append(
                f'<rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w:.1f}" height="{h}" rx="{h / 2}" '
                f'fill="{fill}" stroke="{stroke}" stroke-width="1"/>'
                f'<text x="{x:.1f}" y="{y + 4:.1f}" class="io">{_e(a["label"])}</text>'
            )
        else:
            sym = _fn_label(g, k)
            parts.append(
                f'<rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w:.1f}" height="{h}" rx="{h / 2}" fill="{fill}" '
                f'stroke="{stroke}" stroke-width="1.2"/><text x="{x:.1f}" y="{y + 4:.1f}" class="fn">{_e(sym)}</text>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- page pieces


def _abbrev(name: str) -> str:
    """A tile-sized mixer name: discrete_mamba2 -> d.mamba2."""
    if len(name) <= 7:
        return name
    *head, last = name.split("_")
    return ("".join(h[:1] for h in head) + "." if head else "") + last[:7]


def _strip(d: Diff, group_of: dict[int, int], max_width: int = 1220) -> str:
    """Every block as a small tile, flowing in rows: embeddings, blocks, final norm, head."""
    tile, gap, side, row_h = 46, 8, 62, 58
    mg = d.student_graph
    items: list[tuple[str, Any]] = [("part", ("positions" if p.rsplit(".", 1)[-1] in ("wpe", "embed_positions") else "embed", p)) for p in (mg.embeddings if mg else [])]
    items += [("block", b) for b in d.blocks]
    if mg is not None:
        items += [("part", (name, p)) for name, p in (("norm", mg.final_norm), ("head", mg.head)) if p]
    out: list[str] = []
    x, y, width = 8.0, 8.0, 0.0
    for kind, item in items:
        w = tile if kind == "block" else side
        if x + w > max_width:
            x, y = 8.0, y + row_h
        if kind == "part":
            label, path = item
            out.append(
                f'<g><title>{_e(path)}</title><rect x="{x}" y="{y}" width="{w}" height="{tile}" rx="8" fill="#f1f5f9" '
                f'stroke="#64748b"/><text x="{x + w / 2}" y="{y + tile / 2 + 4}" class="tile">{_e(label)}</text></g>'
            )
        else:
            b = item
            color = STATUS_COLOR[b.status]
            fill = color if b.status == "replaced" else ("#dbeafe" if b.status == "kept" else "#f1f5f9")
            text_color = "#fff" if b.status == "replaced" else "#0f172a"
            tag = _abbrev(b.mixer or "") if b.status == "replaced" else ("attn" if b.status != "changed" else "Δ")
            tip = f"{b.path}: {STATUS_TEXT[b.status]}" + (f" → {b.mixer}" if b.mixer else "")
            tip += f"\n{b.params_before:,} → {b.params_after:,} params"
            out.append(
                f'<a href="#group-{group_of.get(b.layer, 0)}"><g><title>{_e(tip)}</title>'
                f'<rect x="{x}" y="{y}" width="{w}" height="{tile}" rx="8" fill="{fill}" stroke="{color}" stroke-width="1.5"/>'
                f'<text x="{x + w / 2}" y="{y + 20}" class="tilenum" fill="{text_color}">{b.layer}</text>'
                f'<text x="{x + w / 2}" y="{y + 35}" class="tiletag" fill="{text_color}">{_e(tag)}</text></g></a>'
            )
        x += w + gap
        width = max(width, x)
    height = y + tile + 10
    head = f'<svg class="strip" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" role="img" aria-label="blocks">'
    return head + "".join(out) + "</svg>"


def _composition(mg: ModelGraph | None) -> dict[str, int]:
    """Parameters by role: embeddings, attention, mixers, MLPs, norms, head (tied head counted once)."""
    if mg is None:
        return {}
    out: dict[str, int] = defaultdict(int)
    seen: set[int] = set()

    def count(module: Any) -> int:
        n = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    for path in mg.embeddings:
        out["embeddings"] += count(mg.model.get_submodule(path))
    for block in mg.blocks:
        g = block.to_networkx()
        for k, a in g.nodes(data=True):
            if a["op"] == "call_module" and "#" not in k:
                role = {"attention": "attention", "mixer": "mixers", "norm": "norms", "mlp": "MLPs"}.get(a["kind"], "other")
                out[role] += count(block.module(a["target"]))
        out["other"] += count(block.root.layer)  # anything not under a traced leaf
    if mg.final_norm:
        out["norms"] += count(mg.model.get_submodule(mg.final_norm))
    if mg.head:
        out["head"] += count(mg.model.get_submodule(mg.head))
    return {k: v for k, v in out.items() if v}


ROLE_COLOR = {
    "embeddings": "#0ea5e9", "attention": "#2563eb", "mixers": "#ea580c", "MLPs": "#059669",
    "norms": "#7c3aed", "head": "#0f766e", "other": "#94a3b8",
}  # fmt: skip


def _composition_svg(d: Diff) -> str:
    before, after = _composition(d.teacher_graph), _composition(d.student_graph)
    total = max(sum(before.values()), sum(after.values()), 1)
    width, bar_w, left = 760, 560, 90
    out = [f'<svg class="bars" viewBox="0 0 {width} 110" width="{width}" height="110" role="img" aria-label="parameters">']
    for row, (label, comp) in enumerate((("teacher", before), ("student", after))):
        y = 10 + row * 38
        out.append(f'<text x="{left - 10}" y="{y + 17}" class="barlabel">{label}</text>')
        x = float(left)
        for role in ROLE_COLOR:
            v = comp.get(role, 0)
            if not v:
                continue
            w = bar_w * v / total
            out.append(
                f'<g><title>{_e(role)}: {v:,} ({100 * v / sum(comp.values()):.1f}%)</title>'
                f'<rect x="{x:.1f}" y="{y}" width="{max(w, 0.5):.1f}" height="24" fill="{ROLE_COLOR[role]}"/></g>'
            )
            x += w
        out.append(f'<text x="{x + 8:.1f}" y="{y + 17}" class="bartotal">{sum(comp.values()):,}</text>')
    x = float(left)
    for role, color in ROLE_COLOR.items():
        if role in before or role in after:
            out.append(f'<rect x="{x}" y="92" width="11" height="11" rx="2" fill="{color}"/>'
                       f'<text x="{x + 16}" y="101" class="legend">{role}</text>')  # fmt: skip
            x += 26 + 7.2 * len(role)
    out.append("</svg>")
    return "".join(out)


def _block_groups(d: Diff) -> list[list[BlockDiff]]:
    """Blocks grouped by what happened to them (status + attention class + mixer), in first-layer order."""
    groups: dict[tuple[Any, ...], list[BlockDiff]] = {}
    changes = {c.key: c for c in d.nodes_replaced}
    for b in d.blocks:
        sig: tuple[Any, ...] = (b.status, b.teacher_attention, b.mixer)
        if b.status == "replaced":
            c = changes[b.replaced[0]]
            sig += (c.params_after, tuple(relative_transfer(c).items()))
        groups.setdefault(sig, []).append(b)
    return list(groups.values())


def _tensor_table(change: NodeChange) -> str:
    transfer = relative_transfer(change)
    rows = []
    for name, shape in change.removed_tensors.items():
        rows.append(f'<tr class="rm"><td>−</td><td><code>{_e(name)}</code></td><td>{_e(tuple(shape))}</td><td>teacher only</td></tr>')
    for name, shape in change.added_tensors.items():
        src = transfer.pop(name, None)
        how = f"← <code>{_e(src)}</code>" if src else '<span class="muted">new (initialised)</span>'
        rows.append(f'<tr class="add"><td>+</td><td><code>{_e(name)}</code></td><td>{_e(tuple(shape))}</td><td>{how}</td></tr>')
    for target, src in transfer.items():
        rows.append(f'<tr class="add"><td>~</td><td><code>{_e(target)}</code> (view)</td><td></td><td>← <code>{_e(src)}</code></td></tr>')
    note = " (inferred by comparing weights)" if change.transfer_inferred else ""
    return (
        f'<table class="tensors"><thead><tr><th></th><th>tensor</th><th>shape</th><th>source{note}</th></tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table>'
    )


def _group_card(d: Diff, idx: int, group: list[BlockDiff]) -> str:
    first = group[0]
    layers = layer_ranges([b.layer for b in group])
    tg = d.teacher_graph.blocks[first.layer] if d.teacher_graph else None
    sg = d.student_graph.blocks[first.layer] if d.student_graph else None
    color = STATUS_COLOR[first.status]
    what = {
        "replaced": f"{_e(first.teacher_attention)} → <b>{_e(first.mixer)}</b>",
        "kept": f"{_e(first.teacher_attention)} kept by a <code>keep</code> rule",
        "unchanged": f"{_e(first.teacher_attention)} unchanged (no rule matched)",
        "changed": "graph changed",
    }[first.status]
    head = (
        f'<div class="card" id="group-{idx}"><div class="cardhead"><span class="pill" style="background:{color}">'
        f"{_e(STATUS_TEXT[first.status])}</span> <h3>Layer{'s' if len(group) > 1 else ''} {_e(layers)}</h3>"
        f'<span class="what">{what}</span><span class="count">{len(group)} block{"s" if len(group) > 1 else ""}'
        f" · drawn: layer {first.layer}</span></div>"
    )
    body = ""
    if first.status == "replaced" and tg is not None and sg is not None:
        keys = set(first.replaced)
        body += (
            '<div class="pair"><figure><figcaption>teacher</figcaption>'
            + block_svg(tg, {k: "removed" for k in keys}, f"teacher layer {first.layer}")
            + '</figure><div class="arrow">→</div><figure><figcaption>student</figcaption>'
            + block_svg(sg, {k: "mixer" for k in keys}, f"student layer {first.layer}")
            + "</figure></div>"
        )
        change = next(c for c in d.nodes_replaced if c.key == first.replaced[0])
        body += (
            f'<p class="nodeline"><code>{_e(group_label([c for c in d.nodes_replaced if c.key in {k for b in group for k in b.replaced}]))}</code>: '
            f"{_e(change.teacher_class)} ({change.params_before:,} params) → {_e(change.student_class)} "
            f"({change.params_after:,} params)</p>" + _tensor_table(change)
        )
        for b in group:
            if b.edges_added or b.edges_removed:
                body += f'<p class="warn">layer {b.layer}: {len(b.edges_added)} edges added, {len(b.edges_removed)} removed</p>'
    elif sg is not None:
        body += '<div class="pair"><figure><figcaption>teacher = student</figcaption>' + block_svg(sg, {}, f"layer {first.layer}") + "</figure></div>"
    return head + body + "</div>"


def _short(name: str) -> str:
    """'q_proj.weight (expanded x2 per group)' -> 'q_proj'."""
    return name.split(" (", 1)[0].replace(".weight", "")


def _node_table(d: Diff) -> str:
    changes = {c.key: c for c in d.nodes_replaced}
    rows = []
    for b in d.blocks:
        c = changes.get(b.replaced[0]) if b.replaced else None
        student = c.student_class if c else b.teacher_attention
        delta = b.params_after - b.params_before
        dcls = "pos" if delta > 0 else ("neg" if delta < 0 else "muted")
        transfer = ", ".join(f"{_short(t)}←{_short(s)}" for t, s in relative_transfer(c).items()) if c else ""
        attention = b.replaced[0] if b.replaced else (b.path + "." + (d.teacher_graph.blocks[b.layer].attention.rsplit(".", 1)[-1] if d.teacher_graph else ""))
        rows.append(
            f'<tr><td class="num">{b.layer}</td><td><code>{_e(attention)}</code></td>'
            f'<td class="nw"><span class="dot" style="background:{STATUS_COLOR[b.status]}"></span>{_e(STATUS_TEXT[b.status])}</td>'
            f"<td>{_e(b.teacher_attention)}</td><td>{_e(student)}</td>"
            f'<td class="num">{b.params_before:,}</td><td class="num">{b.params_after:,}</td>'
            f'<td class="num {dcls}">{delta:+,}</td><td class="small">{_e(transfer) or "—"}</td></tr>'
        )
    return (
        '<table class="nodes"><thead><tr><th>layer</th><th>attention node</th><th>status</th><th>teacher</th>'
        "<th>student</th><th>params before</th><th>after</th><th>Δ</th><th>transferred</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#0f172a;background:#f8fafc}
header{background:linear-gradient(135deg,#0f172a,#1e293b);color:#f8fafc;padding:26px 36px 22px}
header h1{margin:0;font-size:22px;font-weight:650;letter-spacing:.2px}
header .sub{color:#94a3b8;margin-top:4px}
main{padding:22px 36px 40px;max-width:1500px}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin:-38px 0 20px}
.stat{background:#fff;border:1px solid #e2e8f0;border-radius:12px;padding:12px 18px;min-width:150px;box-shadow:0 1px 2px rgba(15,23,42,.06)}
.stat .v{font-size:22px;font-weight:650}
.stat .l{color:#64748b;font-size:12px;text-transform:uppercase;letter-spacing:.6px}
.stat .d{font-size:12px}
h2{font-size:15px;margin:26px 0 10px;color:#334155;text-transform:uppercase;letter-spacing:.7px}
h3{display:inline;font-size:16px;margin:0 8px 0 6px}
.panel,.card{background:#fff;border:1px solid #e2e8f0;border-radius:12px;padding:16px 18px;margin-bottom:16px;box-shadow:0 1px 2px rgba(15,23,42,.05);overflow-x:auto}
.cardhead{margin-bottom:8px}
.cardhead .what{color:#334155}
.cardhead .count{float:right;color:#64748b;font-size:12px;margin-top:3px}
.pill{color:#fff;border-radius:999px;padding:2px 10px;font-size:12px;font-weight:600;vertical-align:2px}
.pair{display:flex;align-items:flex-start;gap:10px}
figure{margin:0;flex:1 1 0;min-width:0}
svg.block{width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#64748b;text-transform:uppercase;letter-spacing:.6px;margin:0 0 2px 8px}
.arrow{font-size:28px;color:#cbd5e1;align-self:center;flex:0 0 auto}
svg text{font-family:inherit}
svg .n1{font-size:12.5px;font-weight:600;text-anchor:middle;fill:#0f172a}
svg .n2{font-size:10.5px;text-anchor:middle}
svg .io{font-size:11px;text-anchor:middle;fill:#334155}
svg .fn{font-size:12px;font-weight:700;text-anchor:middle;fill:#475569}
svg .badge{font-size:9px;font-weight:700;fill:#fff;text-anchor:middle;letter-spacing:.5px}
svg .tile{font-size:11px;text-anchor:middle;fill:#334155}
svg .tilenum{font-size:14px;font-weight:700;text-anchor:middle}
svg .tiletag{font-size:8.5px;text-anchor:middle}
svg .barlabel{font-size:12px;text-anchor:end;fill:#334155}
svg .bartotal{font-size:12px;fill:#334155}
svg .legend{font-size:11.5px;fill:#475569}
table{border-collapse:collapse;width:100%}
th{font-size:11.5px;text-transform:uppercase;letter-spacing:.5px;color:#64748b;text-align:left;border-bottom:1px solid #e2e8f0;padding:6px 8px}
td{border-bottom:1px solid #f1f5f9;padding:5px 8px;vertical-align:top}
td.nw{white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.pos{color:#c2410c}td.neg{color:#15803d}
.small{font-size:12px;color:#475569}
.muted{color:#94a3b8}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f1f5f9;border-radius:4px;padding:1px 4px}
table.tensors{width:auto;margin-top:6px}
table.tensors tr.rm td{color:#b91c1c}
table.tensors tr.add td:first-child{color:#c2410c;font-weight:700}
.nodeline{margin:12px 0 0}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px}
.legendrow{display:flex;gap:16px;flex-wrap:wrap;font-size:12px;color:#475569;margin-top:8px}
.legendrow span i{display:inline-block;width:14px;height:10px;border-radius:3px;margin-right:5px;vertical-align:-1px;border:1.5px solid}
.warn{color:#be185d}
footer{color:#94a3b8;font-size:12px;padding:0 36px 30px}
"""


def render(d: Diff) -> str:
    """The whole page."""
    from . import __version__

    c = d.counts()
    delta = d.total_after - d.total_before
    pct = 100.0 * delta / d.total_before if d.total_before else 0.0
    groups = _block_groups(d)
    group_of = {b.layer: i for i, g in enumerate(groups) for b in g}
    mixers = sorted({b.mixer for b in d.blocks if b.mixer})
    stats = [
        (f"{c['replaced_blocks']}/{c['blocks']}", "blocks replaced", ", ".join(mixers) or "—"),
        (str(c["kept_blocks"] + c["unchanged_blocks"]), "attention kept", f"{c['kept_blocks']} by rule, {c['unchanged_blocks']} unmatched"),
        (_n(d.total_after), "parameters after", f'<span style="color:{"#c2410c" if delta > 0 else "#15803d"}">{delta:+,} ({pct:+.1f}%)</span> from {_n(d.total_before)}'),
        (str(c["edges_added"] + c["edges_removed"]), "edges changed", f"{c['nodes_added']} nodes added, {c['nodes_removed']} removed"),
    ]
    cards = "".join(f'<div class="stat"><div class="l">{_e(label)}</div><div class="v">{_e(v)}</div><div class="d">{sub}</div></div>' for v, label, sub in stats)
    legend = "".join(
        f'<span><i style="background:{KIND_STYLE[k][1]};border-color:{KIND_STYLE[k][0]}"></i>{label}</span>'
        for k, label in (("removed", "replaced (teacher)"), ("mixer", "new mixer"), ("attention", "attention"),
                         ("norm", "norm"), ("mlp", "MLP"), ("module", "other module"), ("function", "function"))
    )  # fmt: skip
    strip_legend = "".join(
        f'<span><i style="background:{col};border-color:{col}"></i>{_e(STATUS_TEXT[s])}</span>' for s, col in STATUS_COLOR.items()
        if any(b.status == s for b in d.blocks)
    )
    extra = ""
    if d.nodes_removed or d.nodes_added:
        items = "".join(f"<li>− <code>{_e(k)}</code></li>" for k in d.nodes_removed) + "".join(
            f"<li>+ <code>{_e(k)}</code></li>" for k in d.nodes_added
        )
        extra = f'<h2>Nodes removed / added</h2><div class="panel"><ul>{items}</ul></div>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>surgery diff · {_e(d.family)}</title><style>{CSS}</style></head>
<body>
<header><h1>surgery diff · {_e(d.family)}</h1>
<div class="sub">teacher → student · {c['blocks']} decoder blocks · {c['nodes_replaced']} attention nodes replaced</div></header>
<main>
<div class="cards">{cards}</div>
<h2>Blocks</h2>
<div class="panel">{_strip(d, group_of)}<div class="legendrow">{strip_legend}<span class="muted">click a block to see its graph</span></div></div>
<h2>Block graphs</h2>
<div class="legendrow" style="margin:-4px 0 10px">{legend}</div>
{"".join(_group_card(d, i, g) for i, g in enumerate(groups))}
{extra}
<h2>Parameters</h2>
<div class="panel">{_composition_svg(d)}</div>
<h2>Attention nodes</h2>
<div class="panel">{_node_table(d)}</div>
</main>
<footer>generated by surgery {__version__} · self-contained page: inline SVG and CSS, no scripts, no network</footer>
</body></html>
"""
