"""Splice mixers into a copy of the teacher, transfer weights, and describe it as a :class:`Plan`.

* :func:`rewrite` -- ``(student, plan)``: a deep copy of the teacher (the student
  owns every tensor; the teacher is untouched) whose selected attention modules
  are replaced, via ``setattr`` on their parent, by what each rule builds from
  the *teacher's* node (weights transferred where ``init`` asks).
* :func:`plan` -- the same decisions without copying anything: mixers are built
  on the ``meta`` device, counts come from ``numel``, so it is cheap even for a
  big hub teacher instantiated on ``meta``.
* :func:`splice` -- rebuild the student's module tree from the recorded node
  list alone (``config.json``'s ``surgery.nodes``); used by ``surgery.load``.

Rules may be :class:`~surgery.recipe.ReplaceRule` objects (``surgery.Replace``)
or plain dicts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rewrites.adapters import AttentionView, get_adapter
from rewrites.registry import get_rule

from .errors import SelectionError
from .recipe import ReplaceRule
from .selector import Match, as_rules, attention_nodes, select

NODES_VERSION = 1


@dataclass
class PlanEntry:
    """One attention node: what it was, which rule took it, what it becomes."""

    path: str
    layer: int
    teacher_class: str
    rule_index: int | None  # None: no rule matched (the attention stays)
    rule: str | None  # rule name ("keep", "discrete_mamba2", ...)
    mixer: str | None  # mixer name; None when the attention stays
    params: dict[str, Any]  # resolved mixer params ({} for keep / unchanged)
    init: dict[str, Any]
    params_before: int
    params_after: int
    student_class: str
    transfer: dict[str, str] = field(default_factory=dict)  # {student tensor: teacher source}
    attention: dict[str, Any] = field(default_factory=dict)  # the teacher node's geometry (AttentionView.info)

    @property
    def replaced(self) -> bool:
        return self.mixer is not None

    @property
    def status(self) -> str:
        return "replaced" if self.replaced else ("kept" if self.rule is not None else "unchanged")


@dataclass
class Plan:
    """What a rule list does to a model: one entry per attention node, in layer order."""

    family: str
    n_layers: int
    entries: list[PlanEntry]
    rules: list[dict[str, Any]]
    total_before: int
    total_after: int

    @property
    def replaced(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.replaced]

    def nodes(self) -> list[dict[str, Any]]:
        """The node list for the student config's ``surgery`` section (what :func:`splice` reads)."""
        return [
            {"path": e.path, "layer": e.layer, "rule": e.rule, "mixer": e.mixer, "params": e.params}
            for e in self.entries
            if e.rule is not None
        ]

    def to_dict(self) -> dict[str, Any]:
        """Json-able form (``surgery plan --json``)."""
        return {
            "version": NODES_VERSION,
            "family": self.family,
            "n_layers": self.n_layers,
            "summary": self.summary(),
            "rules": self.rules,
            "entries": [asdict(e) | {"status": e.status} for e in self.entries],
            "nodes": self.nodes(),
        }

    def summary(self) -> dict[str, Any]:
        by_mixer: dict[str, int] = {}
        for e in self.replaced:
            by_mixer[e.mixer] = by_mixer.get(e.mixer, 0) + 1  # type: ignore[index]
        return {
            "attention_nodes": len(self.entries),
            "replaced": len(self.replaced),
            "kept": sum(e.status == "kept" for e in self.entries),
            "unchanged": sum(e.status == "unchanged" for e in self.entries),
            "by_mixer": by_mixer,
            "params_before": self.total_before,
            "params_after": self.total_after,
        }

    def to_text(self) -> str:
        """An aligned table, one row per attention node, and a summary line."""
        header = ["layer", "path", "teacher", "rule", "becomes", "params", "transfer"]
        rows = [header]
        for e in self.entries:
            rule = "-" if e.rule_index is None else f"#{e.rule_index} {e.rule}"
            becomes = e.mixer or ("(kept)" if e.rule == "keep" else "(unchanged)")
            change = f"{_n(e.params_before)} -> {_n(e.params_after)}" if e.replaced else _n(e.params_before)
            transfer = _transfer_short(e.transfer, e.path) if e.replaced else ""
            rows.append([str(e.layer), e.path, e.teacher_class, rule, becomes, change, transfer])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        right = {0, 5}
        lines = []
        for j, r in enumerate(rows):
            cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
            lines.append("  ".join(cells).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        s = self.summary()
        mixers = ", ".join(f"{n} {m}" for m, n in s["by_mixer"].items()) or "none"
        delta = self.total_after - self.total_before
        pct = 100.0 * delta / self.total_before if self.total_before else 0.0
        lines.append("")
        adapter = next((e.attention.get("adapter") for e in self.entries if e.attention.get("adapter")), None)
        lines.append(
            f"{self.family}{f' (adapter {adapter})' if adapter else ''}: {s['attention_nodes']} attention nodes; replaced {s['replaced']} ({mixers}), "
            f"kept {s['kept']}, unchanged {s['unchanged']}. "
            f"Parameters {_n(self.total_before)} -> {_n(self.total_after)} ({delta:+,}, {pct:+.1f}%)."
        )
        return "\n".join(lines)


def _n(x: int) -> str:
    return f"{x:,}"


def _transfer_short(record: dict[str, str], path: str) -> str:
    """``{"<path>.C_proj.weight": "<path>.q_proj.weight"}`` -> ``"C_proj<-q_proj"``."""
    if not record:
        return "none"

    def short(name: str) -> str:
        name = name.split(" (", 1)[0].removeprefix(path + ".")
        return name.replace(".weight", "")

    return ", ".join(f"{short(t)}<-{short(s)}" for t, s in record.items())


# --------------------------------------------------------------------------- module tree edits


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at ``path`` (``setattr`` on its parent)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if not hasattr(parent, name):
        raise KeyError(f"{type(parent).__name__} at {parent_path or '(root)'} has no child {name!r}")
    setattr(parent, name, module)


def _enable_cache(model: nn.Module) -> None:
    """``surgery.cache.enable_recurrent_cache(model)`` when that module exists."""
    try:
        from surgery.cache import enable_recurrent_cache  # type: ignore[attr-defined]
    except ImportError as err:
        if getattr(err, "name", None) in ("surgery.cache", None) or "enable_recurrent_cache" in str(err):
            return
        raise
    enable_recurrent_cache(model)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _build(match: Match, view: AttentionView) -> tuple[nn.Module, dict[str, str], PlanEntry]:
    spec = get_rule(match.rule.mixer)
    module, record = spec.build(view, match.rule.params, match.rule.init)
    module.train(view.module.training)  # a fresh mixer would default to training mode
    mixer_params = getattr(module, "params", None)
    params = mixer_params.model_dump(mode="json") if spec.replaces and hasattr(mixer_params, "model_dump") else {}
    entry = PlanEntry(
        path=match.path,
        layer=match.layer,
        teacher_class=match.type,
        rule_index=match.rule_index,
        rule=spec.name,
        mixer=getattr(module, "name", spec.name) if spec.replaces else None,
        params=params,
        init=dict(match.rule.init),
        params_before=view.params(),
        params_after=_numel(module) if spec.replaces else view.params(),
        student_class=type(module).__name__,
        transfer=dict(record),
        attention=view.info(),
    )
    return module, record, entry


def _unchanged(view: AttentionView) -> PlanEntry:
    n = view.params()
    return PlanEntry(view.path, view.layer, view.type, None, None, None, {}, {}, n, n, view.type, {}, view.info())


def _assemble(model: nn.Module, rules: list[ReplaceRule], entries: dict[str, PlanEntry]) -> Plan:
    views = attention_nodes(model)
    ordered = [entries.get(v.path) or _unchanged(v) for v in views]
    total = _numel(model)
    after = total + sum(e.params_after - e.params_before for e in ordered)
    return Plan(
        family=get_adapter(model).family,
        n_layers=len(views),
        entries=ordered,
        rules=[r.model_dump(mode="json") for r in rules],
        total_before=total,
        total_after=after,
    )


def plan(model: nn.Module, rules: Iterable[ReplaceRule | dict[str, Any]] | None) -> Plan:
    """What ``rewrite(model, rules)`` would do, with mixers built on ``meta`` (no weights touched)."""
    rules = as_rules(rules)
    entries = {}
    for m in select(model, rules):
        _, _, entry = _build(m, m.view.on_meta())
        entries[m.path] = entry
    return _assemble(model, rules, entries)


def rewrite(teacher: nn.Module, rules: Iterable[ReplaceRule | dict[str, Any]] | None) -> tuple[nn.Module, Plan]:
    """Deep-copy ``teacher``, splice in what ``rules`` build (weights transferred); returns ``(student, plan)``.

    Works on a ``meta`` teacher too (a weightless student skeleton, e.g. for ``surgery diff``).
    """
    rules = as_rules(rules)
    matches = select(teacher, rules)
    student = copy.deepcopy(teacher)
    entries: dict[str, PlanEntry] = {}
    for m in matches:
        module, _, entry = _build(m, m.view)  # built from the teacher's node
        if entry.replaced:
            set_module(student, m.path, module)
        entries[m.path] = entry
    result = _assemble(teacher, rules, entries)
    _enable_cache(student)
    return student, result


def splice(model: nn.Module, nodes: list[dict[str, Any]]) -> nn.Module:
    """Rebuild the module tree from ``nodes`` (``[{"path","layer","rule","mixer","params"}]``), in place.

    No weights are transferred: the mixers are constructed (on the device and
    dtype of the module they replace) for a state dict to be loaded afterwards.
    Returns ``model``.
    """
    from surgery.mixers import get_mixer

    paths = {v.path: v for v in attention_nodes(model)}
    for i, node in enumerate(nodes):
        path = node.get("path")
        if path not in paths:
            raise SelectionError(
                f"surgery.nodes[{i}]: {path!r} is not an attention node of this model; "
                f"attention nodes look like {next(iter(paths), '?')}"
            )
        spec = get_rule(node["rule"])
        if not spec.replaces:
            continue
        cls = get_mixer(node["mixer"])
        view = paths[path]
        params = cls.params_model.model_validate(node.get("params") or {})
        with torch.device(view.device):
            mixer = cls(view.shape.d_model, params, int(node.get("layer", view.layer)))
        if view.dtype.is_floating_point:
            mixer = mixer.to(dtype=view.dtype)
        mixer.train(view.module.training)
        set_module(model, path, mixer)
    _enable_cache(model)
    return model


def check_splices(teacher: nn.Module, student: nn.Module, plan: Plan | None = None, *, atol: float = 1e-5) -> list[Any]:
    """Run :func:`surgery.graph.check_splice` on every block with a replaced node (all blocks without a plan).

    Returns the :class:`~surgery.graph.SpliceCheck` list; raises ``AssertionError``
    naming the first block whose retargeted FX graph differs from the eager student.
    """
    from .graph import check_splice, trace_block

    adapter = get_adapter(teacher)
    layers = sorted({e.layer for e in plan.replaced}) if plan is not None else range(len(adapter.decoder_layers()))
    checks = [check_splice(trace_block(teacher, i, adapter=adapter), student, atol=atol) for i in layers]
    for c in checks:
        if not c.ok:
            raise AssertionError(
                f"splice check failed at {c.path}: FX graph vs eager student differ by {c.student_max_abs_diff:.3g} "
                f"(teacher trace vs eager: {c.teacher_max_abs_diff:.3g}; atol {c.atol})"
            )
    return checks
