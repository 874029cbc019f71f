"""Teacher-vs-student diff over block graphs: what was replaced, what moved, what was transferred.

:func:`diff` traces both models block by block (:mod:`surgery.graph`), compares
the networkx views by their stable node keys and reports

* nodes removed / added / replaced (same key, different module class),
* edges added / removed,
* parameters per block and in total, before and after,
* for each replaced node, the tensors that left and arrived and what each new
  tensor was transferred from (from the :class:`~surgery.rewriter.Plan` when
  given, otherwise inferred by comparing the mixer's ``weight_views()`` with
  the teacher's attention weights).

``to_text()`` for terminals, ``to_dict()`` (json) for tools, ``to_html()`` for
people: one self-contained page (inline SVG and CSS, no network, no scripts)
drawn by :mod:`surgery.diff_html`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rewrites.adapters import get_adapter

from .graph import ModelGraph, trace_model
from .mixers.base import Mixer

if TYPE_CHECKING:
    from .rewriter import Plan

SOURCE_OF = {"C": "q", "B": "k", "x": "v", "out": "o"}


@dataclass
class NodeChange:
    """One replaced module node."""

    key: str  # module path, e.g. "model.layers.3.self_attn"
    layer: int | None
    teacher_class: str
    student_class: str
    mixer: str | None
    params_before: int
    params_after: int
    removed_tensors: dict[str, list[int]]  # name (relative to key) -> shape
    added_tensors: dict[str, list[int]]
    transfer: dict[str, str]  # student tensor -> teacher source
    transfer_inferred: bool = False  # True when read off the weights (no plan given)


@dataclass
class BlockDiff:
    """One decoder block: status, parameters, what changed in its graph."""

    path: str
    layer: int
    status: str  # "replaced" | "kept" | "unchanged" | "changed"
    params_before: int
    params_after: int
    replaced: list[str]
    edges_added: list[tuple[str, str]] = field(default_factory=list)
    edges_removed: list[tuple[str, str]] = field(default_factory=list)
    mixer: str | None = None
    teacher_attention: str = ""


@dataclass
class Diff:
    """Everything :func:`diff` found; render with :meth:`to_text`, :meth:`to_dict`, :meth:`to_html`."""

    family: str
    blocks: list[BlockDiff]
    nodes_removed: list[str]
    nodes_added: list[str]
    nodes_replaced: list[NodeChange]
    edges_added: list[tuple[str, str]]
    edges_removed: list[tuple[str, str]]
    params_before: dict[str, int]  # per top-level part (embeddings, blocks, norm, head) + "total"
    params_after: dict[str, int]
    plan: dict[str, Any] | None = None
    teacher_graph: ModelGraph | None = field(default=None, repr=False)
    student_graph: ModelGraph | None = field(default=None, repr=False)

    @property
    def total_before(self) -> int:
        return self.params_before["total"]

    @property
    def total_after(self) -> int:
        return self.params_after["total"]

    def counts(self) -> dict[str, int]:
        status = [b.status for b in self.blocks]
        return {
            "blocks": len(self.blocks),
            "replaced_blocks": status.count("replaced"),
            "kept_blocks": status.count("kept"),
            "unchanged_blocks": status.count("unchanged"),
            "nodes_replaced": len(self.nodes_replaced),
            "nodes_removed": len(self.nodes_removed),
            "nodes_added": len(self.nodes_added),
            "edges_added": len(self.edges_added),
            "edges_removed": len(self.edges_removed),
        }

    # ------------------------------------------------------------------ renderers

    def to_dict(self) -> dict[str, Any]:
        """Json-able form (``surgery diff --format json``)."""
        graphs = {}
        if self.student_graph is not None:
            for block in self.student_graph.blocks:
                g = block.to_networkx()
                graphs[block.path] = {
                    "nodes": [
                        {"key": k, **{a: g.nodes[k][a] for a in ("op", "kind", "module_class", "params", "target")}}
                        for k in g.nodes
                    ],
                    "edges": [list(e) for e in g.edges],
                }
        return {
            "family": self.family,
            "summary": self.counts() | {"params_before": self.total_before, "params_after": self.total_after},
            "params": {"before": self.params_before, "after": self.params_after},
            "blocks": [asdict(b) for b in self.blocks],
            "nodes": {
                "removed": self.nodes_removed,
                "added": self.nodes_added,
                "replaced": [asdict(c) for c in self.nodes_replaced],
            },
            "edges": {"added": [list(e) for e in self.edges_added], "removed": [list(e) for e in self.edges_removed]},
            "student_block_graphs": graphs,
            "plan": self.plan,
        }

    def to_text(self) -> str:
        """Summary, a per-block table and each replaced node's tensors and sources."""
        c = self.counts()
        delta = self.total_after - self.total_before
        pct = 100.0 * delta / self.total_before if self.total_before else 0.0
        lines = [
            f"{self.family}: {c['blocks']} blocks; {c['nodes_replaced']} nodes replaced, {c['nodes_removed']} removed, "
            f"{c['nodes_added']} added; {c['edges_added'] + c['edges_removed']} edges changed",
            f"parameters: {self.total_before:,} -> {self.total_after:,} ({delta:+,}, {pct:+.1f}%)",
            "",
        ]
        rows = [["block", "path", "status", "params", "change"]]
        for b in self.blocks:
            params = f"{b.params_before:,}" if b.params_before == b.params_after else f"{b.params_before:,} -> {b.params_after:,}"
            change = ""
            if b.replaced:
                change = f"{b.teacher_attention} -> {b.mixer or '?'}"
            if b.edges_added or b.edges_removed:
                change += f" (+{len(b.edges_added)}/-{len(b.edges_removed)} edges)"
            rows.append([str(b.layer), b.path, b.status, params, change])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for j, r in enumerate(rows):
            lines.append("  ".join(x.rjust(widths[i]) if i in (0, 3) else x.ljust(widths[i]) for i, x in enumerate(r)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.nodes_removed:
            lines += ["", "nodes removed:"] + [f"  - {k}" for k in self.nodes_removed]
        if self.nodes_added:
            lines += ["", "nodes added:"] + [f"  + {k}" for k in self.nodes_added]
        if self.nodes_replaced:
            lines += ["", "replaced nodes (identical changes grouped):"]
        for group in group_changes(self.nodes_replaced):
            n = group[0]
            how = " (inferred from weights)" if n.transfer_inferred else ""
            lines.append(
                f"  {group_label(group)}: {n.teacher_class} -> {n.student_class}"
                f" [{n.params_before:,} -> {n.params_after:,} params each]"
            )
            transfer = relative_transfer(n)
            for name, shape in n.removed_tensors.items():
                lines.append(f"      - {name} {tuple(shape)}")
            for name, shape in n.added_tensors.items():
                src = transfer.pop(name, None)
                lines.append(f"      + {name} {tuple(shape)}" + (f"  <- {src}{how}" if src else "  (new)"))
            for target, src in transfer.items():
                lines.append(f"      ~ {target} (view) <- {src}{how}")
        return "\n".join(lines)

    def to_html(self) -> str:
        """A self-contained HTML page (inline SVG/CSS; no network, no scripts)."""
        from .diff_html import render

        return render(self)


# --------------------------------------------------------------------------- grouping for display


def relative_transfer(change: NodeChange) -> dict[str, str]:
    """The transfer record with the node's own path stripped from both sides."""
    prefix = change.key + "."
    return {t.removeprefix(prefix): s.removeprefix(prefix) for t, s in change.transfer.items()}


def _signature(change: NodeChange) -> tuple[Any, ...]:
    return (
        change.teacher_class,
        change.student_class,
        change.params_before,
        change.params_after,
        tuple((k, tuple(v)) for k, v in change.removed_tensors.items()),
        tuple((k, tuple(v)) for k, v in change.added_tensors.items()),
        tuple(relative_transfer(change).items()),
        change.transfer_inferred,
    )


def group_changes(changes: list[NodeChange]) -> list[list[NodeChange]]:
    """Replaced nodes grouped by identical change (same classes, tensors and relative transfers)."""
    groups: dict[tuple[Any, ...], list[NodeChange]] = {}
    for c in changes:
        groups.setdefault(_signature(c), []).append(c)
    return list(groups.values())


def layer_ranges(layers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1..3,5'."""
    out, i = [], 0
    layers = sorted(layers)
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        out.append(str(layers[i]) if i == j else f"{layers[i]}..{layers[j]}")
        i = j + 1
    return ",".join(out)


def group_label(group: list[NodeChange]) -> str:
    """``model.layers.{1..3,5}.self_attn`` for a group, the plain key for one node."""
    first = group[0]
    if len(group) == 1 or first.layer is None:
        return first.key if len(group) == 1 else ", ".join(c.key for c in group)
    token = f".{first.layer}."
    if all(token.replace(str(first.layer), str(c.layer)) in c.key for c in group) and token in first.key:
        head, _, tail = first.key.partition(token)
        return f"{head}.{{{layer_ranges([int(c.layer) for c in group])}}}.{tail}"
    return ", ".join(c.key for c in group)


# --------------------------------------------------------------------------- computing the diff


def _tensors(module: nn.Module) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in module.state_dict().items()}


def _infer_transfer(teacher: nn.Module, path: str, mixer: Mixer) -> dict[str, str]:
    """Which of the mixer's head-major views equal the teacher's attention weights (GQA-aware)."""
    if any(p.is_meta for p in mixer.parameters()):
        return {}
    try:
        views = mixer.weight_views()
    except NotImplementedError:
        return {}
    adapter = get_adapter(teacher)
    view = next((v for v in adapter.attention_views() if v.path == path), None)
    if view is None or any(p.is_meta for p in view.module.parameters()):
        return {}
    w, sources = view.weights(), view.sources()
    found = {}
    for key, src in SOURCE_OF.items():
        m, t = views.get(key), getattr(w, src)
        if m is None or m.dim() != 3:
            continue
        head_axis, dim_axis, d_axis = (1, 2, 0) if key == "out" else (0, 1, 2)  # out: (d, h, p); else (h, p, d)
        if m.shape[d_axis] != t.shape[d_axis] or m.shape[head_axis] % t.shape[head_axis]:
            continue
        idx = torch.arange(m.shape[head_axis]) * t.shape[head_axis] // m.shape[head_axis]  # mixer -> teacher head
        expanded = t.index_select(head_axis, idx)
        n = min(m.shape[dim_axis], t.shape[dim_axis])
        if torch.equal(m.detach().to(t.dtype).narrow(dim_axis, 0, n), expanded.narrow(dim_axis, 0, n)):
            found[f"{path}.{key}"] = sources[src]
    return found


def diff(teacher: nn.Module, student: nn.Module, plan: Plan | None = None) -> Diff:
    """Compare ``teacher`` and ``student`` block graphs (real or meta models)."""
    tg, sg = trace_model(teacher), trace_model(student)
    T, S = tg.to_networkx(), sg.to_networkx()
    removed = [k for k in T if k not in S]
    added = [k for k in S if k not in T]
    entries = {e.path: e for e in plan.entries} if plan is not None else {}

    replaced: list[NodeChange] = []
    for key in T:
        if key not in S:
            continue
        a, b = T.nodes[key], S.nodes[key]
        if a["op"] != "call_module" or (a["module_class"] == b["module_class"] and a["op"] == b["op"]):
            continue
        tm, sm = teacher.get_submodule(a["target"]), student.get_submodule(b["target"])
        entry = entries.get(key)
        if entry is not None:
            transfer, inferred = dict(entry.transfer), False
        else:
            transfer = _infer_transfer(teacher, key, sm) if isinstance(sm, Mixer) else {}
            inferred = bool(transfer)
        replaced.append(
            NodeChange(
                key=key,
                layer=a.get("layer"),
                teacher_class=a["module_class"],
                student_class=b["module_class"],
                mixer=getattr(sm, "name", None) or None,
                params_before=a["params"],
                params_after=b["params"],
                removed_tensors=_tensors(tm),
                added_tensors=_tensors(sm),
                transfer=transfer,
                transfer_inferred=inferred,
            )
        )
    by_key = {c.key: c for c in replaced}

    edges_t, edges_s = set(T.edges), set(S.edges)
    edges_added = sorted(edges_s - edges_t)
    edges_removed = sorted(edges_t - edges_s)
    pt, ps = tg.params(), sg.params()
    blocks = []
    for tb, sb in zip(tg.blocks, sg.blocks):
        keys = [k for k in by_key if k.startswith(tb.path + ".")]
        e_add = [e for e in edges_added if e[0].startswith(tb.path) or e[1].startswith(tb.path)]
        e_rem = [e for e in edges_removed if e[0].startswith(tb.path) or e[1].startswith(tb.path)]
        entry = entries.get(tb.attention)
        if keys:
            status = "replaced"
        elif entry is not None and entry.status == "kept":
            status = "kept"
        elif e_add or e_rem or pt[tb.path] != ps.get(sb.path, pt[tb.path]):
            status = "changed"
        else:
            status = "unchanged"
        mixer = by_key[keys[0]].mixer if keys else None
        blocks.append(
            BlockDiff(
                path=tb.path,
                layer=tb.layer,
                status=status,
                params_before=pt[tb.path],
                params_after=ps[sb.path],
                replaced=keys,
                edges_added=e_add,
                edges_removed=e_rem,
                mixer=mixer,
                teacher_attention=T.nodes[tb.attention]["module_class"] or "",
            )
        )
    return Diff(
        family=tg.family,
        blocks=blocks,
        nodes_removed=removed,
        nodes_added=added,
        nodes_replaced=replaced,
        edges_added=edges_added,
        edges_removed=edges_removed,
        params_before=pt,
        params_after=ps,
        plan=plan.to_dict() if plan is not None else None,
        teacher_graph=tg,
        student_graph=sg,
    )
