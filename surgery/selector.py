"""The selector language: which attention nodes each ``replace:`` rule takes.

Candidates are the model's attention nodes (one per decoder layer, found by the
family adapter). Rules apply in order and a node takes the **first** rule that
matches it. Within a rule the given fields compose (all must hold):

* ``modules``: glob(s) over module paths, ``*`` = one path segment, ``**`` = any
  number of segments, ``?`` = one character; a glob matches the whole path or
  a dotted suffix of it (like peft's ``target_modules``: ``self_attn`` matches
  ``model.layers.3.self_attn``). A ``re:`` prefix makes it a regex that must
  match the whole path. Several globs: any may match.
* ``layers``: an int, a list of ints, or a Python slice string (``"0:24:2"``,
  ``"-4:"``, ``"::4"``); negative indices count from the end.
* ``type``: the attention class name (``LlamaAttention``) or ``attention`` (any).
* ``exclude``: glob(s) / ``re:`` regexes of paths to leave out.

Strict by default: a rule that matches nothing, or only nodes already taken by
earlier rules, is an error (:class:`SelectionError`) that names the nearest
candidates, so a typo never silently converts nothing. :func:`preview` shows
what every node would get, like peft's ``inspect_matched_modules``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from rewrites.adapters import AttentionView, get_adapter

from .errors import SelectionError
from .recipe import AUTO_LAYERS, ReplaceRule

ANY_ATTENTION = "attention"

# --------------------------------------------------------------------------- patterns


def glob_to_regex(glob: str) -> str:
    """Translate a path glob to a regex matching the whole path or a dotted suffix."""
    out = ""
    i = 0
    while i < len(glob):
        if glob.startswith("**.", i):
            out += r"(?:[^.]+\.)*"
            i += 3
        elif glob.startswith(".**", i) and i + 3 == len(glob):
            out += r"(?:\.[^.]+)*"
            i += 3
        elif glob.startswith("**", i):
            out += r".*"
            i += 2
        elif glob[i] == "*":
            out += r"[^.]*"
            i += 1
        elif glob[i] == "?":
            out += r"[^.]"
            i += 1
        else:
            out += re.escape(glob[i])
            i += 1
    anchored = glob.startswith("**")
    return out if anchored else r"(?:.*\.)?" + out


def compile_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """Compile a glob or ``re:`` pattern; :class:`SelectionError` for a bad regex."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise SelectionError(f"{where}: empty pattern; write a glob like 'model.layers.*.self_attn' or 're:...'")
    if pattern.startswith("re:"):
        source = pattern[3:]
        try:
            return re.compile(source)
        except re.error as err:
            raise SelectionError(f"{where}: {pattern!r} is not a valid regular expression: {err}") from None
    return re.compile(glob_to_regex(pattern))


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# --------------------------------------------------------------------------- layers


def parse_layers(spec: int | list[int] | str | None, n_layers: int, where: str) -> set[int] | None:
    """Layer indices a ``layers:`` value selects (None: all). Errors name the valid range."""
    if spec is None:
        return None
    if spec == AUTO_LAYERS:
        raise SelectionError(
            f"{where}: layers: auto is chosen from the teacher's activations by surgery plan / surgery apply; from "
            f"Python, resolve it first with surgery.layer_choice.resolve_auto_layers(rules, model, batches)"
        )
    valid = f"the model has {n_layers} decoder layers (0..{n_layers - 1}, or -{n_layers}..-1)"

    def index(i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, int):
            raise SelectionError(f"{where}: layer index {i!r} is not an integer")
        if not -n_layers <= i < n_layers:
            raise SelectionError(f"{where}: layer {i} is out of range; {valid}")
        return i % n_layers

    if isinstance(spec, (int, list, tuple)) and not isinstance(spec, str):
        items = [spec] if isinstance(spec, int) else list(spec)
        if not items:
            raise SelectionError(f"{where}: empty layer list selects nothing; omit `layers` to take all")
        return {index(i) for i in items}
    text = str(spec).strip()
    if ":" not in text:
        try:
            return {index(int(text))}
        except ValueError:
            raise SelectionError(f"{where}: {spec!r} is not a layer index or slice; write e.g. 3, [0, 2], '0:24:2', '-4:'") from None
    parts = [p.strip() for p in text.split(":")]
    if len(parts) > 3:
        raise SelectionError(f"{where}: {spec!r} has too many ':'; a slice is 'start:stop:step'")
    try:
        start, stop, step = (int(p) if p else None for p in (*parts, "")[:3])
    except ValueError:
        raise SelectionError(f"{where}: {spec!r} is not a slice of integers; write e.g. '0:24:2', '-4:', '::4'") from None
    if step == 0:
        raise SelectionError(f"{where}: layer slice {spec!r} has step 0")
    for name, bound in (("start", start), ("stop", stop)):
        if bound is not None and not -n_layers <= bound <= n_layers:
            raise SelectionError(f"{where}: slice {name} {bound} in {spec!r} is out of range; {valid}")
    chosen = set(range(n_layers)[slice(start, stop, step)])
    if not chosen:
        raise SelectionError(f"{where}: layer slice {spec!r} selects no layer; {valid}")
    return chosen


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class Match:
    """One attention node and the rule that takes it."""

    path: str
    layer: int
    type: str  # teacher attention class name
    rule_index: int
    rule: ReplaceRule
    view: AttentionView


def as_rules(rules: Iterable[ReplaceRule | dict[str, Any]] | ReplaceRule | dict[str, Any] | None) -> list[ReplaceRule]:
    """Accept ``ReplaceRule`` objects (``surgery.Replace``) or plain dicts; validate dicts."""
    from pydantic import ValidationError

    from .errors import RecipeError
    from .recipe import format_validation_error

    if rules is None:
        return []
    if isinstance(rules, (ReplaceRule, dict)):
        rules = [rules]
    out: list[ReplaceRule] = []
    for i, r in enumerate(rules):
        if isinstance(r, ReplaceRule):
            out.append(r)
            continue
        try:
            out.append(ReplaceRule.model_validate(r))
        except ValidationError as err:
            raise RecipeError(format_validation_error(err, f"replace[{i}]")) from None
    return out


class _Compiled:
    def __init__(self, rule: ReplaceRule, index: int, n_layers: int, known_types: set[str]) -> None:
        where = f"replace[{index}]"
        self.rule, self.index, self.where = rule, index, where
        self.modules = [compile_pattern(p, f"{where}.modules") for p in _as_list(rule.modules)]
        self.exclude = [compile_pattern(p, f"{where}.exclude") for p in _as_list(rule.exclude)]
        self.layers = parse_layers(rule.layers, n_layers, f"{where}.layers")
        self.type = rule.type
        if self.type is not None and self.type != ANY_ATTENTION and self.type not in known_types:
            from .errors import suggest

            raise SelectionError(
                f"{where}.type: unknown type {self.type!r}{suggest(self.type, known_types | {ANY_ATTENTION})}; "
                f"this model's attention nodes are: {', '.join(sorted(known_types | {ANY_ATTENTION}))}"
            )

    def by_modules(self, v: AttentionView) -> bool:
        return not self.modules or any(p.fullmatch(v.path) for p in self.modules)

    def by_layers(self, v: AttentionView) -> bool:
        return self.layers is None or v.layer in self.layers

    def by_type(self, v: AttentionView) -> bool:
        return self.type in (None, ANY_ATTENTION) or v.type == self.type

    def excluded(self, v: AttentionView) -> bool:
        return any(p.fullmatch(v.path) for p in self.exclude)

    def matches(self, v: AttentionView) -> bool:
        return self.by_modules(v) and self.by_layers(v) and self.by_type(v) and not self.excluded(v)


def _example_path(pattern: str) -> str:
    """A concrete-looking string for a pattern, to compare with candidates by similarity."""
    return pattern[3:] if pattern.startswith("re:") else pattern.replace("**", "0").replace("*", "0")


def _nearest(patterns: Sequence[str], candidates: Sequence[str], n: int = 3) -> list[str]:
    scored: dict[str, float] = {}
    for pattern in patterns:
        probe = _example_path(pattern)
        for c in candidates:
            scored[c] = max(scored.get(c, 0.0), difflib.SequenceMatcher(None, probe, c).ratio())
    return sorted(scored, key=lambda c: (-scored[c], c))[:n]


def _explain_empty(c: _Compiled, views: list[AttentionView], claimed: dict[str, int]) -> str:
    """Why rule ``c`` got no node, with the nearest candidates / what exists."""
    paths = [v.path for v in views]
    head = f"{c.where} (mixer {c.rule.mixer!r})"
    matching = [v for v in views if c.matches(v)]
    if matching:  # everything it matches was taken earlier
        taken = sorted({claimed[v.path] for v in matching})
        shown = ", ".join(v.path for v in matching[:4]) + (" ..." if len(matching) > 4 else "")
        earlier = ", ".join(f"replace[{i}]" for i in taken)
        return (
            f"{head} matches only nodes already taken by {earlier} (the first matching rule wins): {shown}. "
            "Reorder the rules or narrow the earlier one."
        )
    stages = [("modules", c.by_modules), ("layers", c.by_layers), ("type", c.by_type)]
    remaining = views
    for field, test in stages:
        after = [v for v in remaining if test(v)]
        if not after:
            if field == "modules":
                near = _nearest(_as_list(c.rule.modules), paths)
                return (
                    f"{head}: modules {c.rule.modules!r} matches no attention module (rules select attention "
                    "nodes only). "
                    f"Nearest candidates: {', '.join(near)}. "
                    f"Attention modules look like {paths[0]} (layers 0..{len(paths) - 1})."
                )
            if field == "layers":
                have = sorted({v.layer for v in remaining})
                return f"{head}: layers {c.rule.layers!r} selects none of the layers its modules match ({_ranges(have)})."
            types = sorted({v.type for v in remaining})
            return f"{head}: type {c.rule.type!r} matches none of the selected nodes; their types: {', '.join(types)}."
        remaining = after
    shown = ", ".join(v.path for v in remaining[:4]) + (" ..." if len(remaining) > 4 else "")
    return f"{head}: exclude {c.rule.exclude!r} removes every node the rule selects ({shown})."


def _ranges(indices: list[int]) -> str:
    if not indices:
        return "none"
    spans, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        spans.append(f"{start}" if start == prev else f"{start}..{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(spans)


def attention_nodes(model: nn.Module) -> list[AttentionView]:
    """Every attention node of ``model`` (one per decoder layer)."""
    return get_adapter(model).attention_views()


def select(model: nn.Module, rules: Iterable[ReplaceRule | dict[str, Any]] | None, *, strict: bool = True) -> list[Match]:
    """Match ``rules`` against ``model``'s attention nodes; the first matching rule takes a node.

    Returns the matched nodes in layer order. With ``strict`` a rule left with no
    node raises :class:`SelectionError`.
    """
    rules = as_rules(rules)
    views = attention_nodes(model)
    known_types = {v.type for v in views}
    compiled = [_Compiled(r, i, len(views), known_types) for i, r in enumerate(rules)]
    claimed: dict[str, int] = {}
    matches: dict[str, Match] = {}
    for c in compiled:
        got = 0
        for v in views:
            if v.path in claimed or not c.matches(v):
                continue
            claimed[v.path] = c.index
            matches[v.path] = Match(v.path, v.layer, v.type, c.index, c.rule, v)
            got += 1
        if got == 0 and strict:
            raise SelectionError(_explain_empty(c, views, claimed))
    return sorted(matches.values(), key=lambda m: m.layer)


@dataclass
class Selection:
    """What every attention node gets under a rule list (see :func:`preview`)."""

    nodes: list[AttentionView]
    matches: dict[str, Match]
    rules: list[ReplaceRule]

    def to_dict(self) -> dict[str, Any]:
        """``{"matched": {path: {"rule": i, "mixer": name}}, "unmatched": [paths]}`` (peft-like)."""
        return {
            "matched": {p: {"rule": m.rule_index, "mixer": m.rule.mixer, "layer": m.layer} for p, m in self.matches.items()},
            "unmatched": [v.path for v in self.nodes if v.path not in self.matches],
        }

    def to_text(self) -> str:
        width = max((len(v.path) for v in self.nodes), default=4)
        lines = [f"{'layer':>5}  {'path':<{width}}  {'type':<20}  rule"]
        for v in self.nodes:
            m = self.matches.get(v.path)
            rule = f"replace[{m.rule_index}] -> {m.rule.mixer}" if m else "(unchanged)"
            lines.append(f"{v.layer:>5}  {v.path:<{width}}  {v.type:<20}  {rule}")
        n = len(self.matches)
        lines.append(f"{n} of {len(self.nodes)} attention nodes matched by {len(self.rules)} rule(s)")
        return "\n".join(lines)


def preview(model: nn.Module, rules: Iterable[ReplaceRule | dict[str, Any]] | None, *, strict: bool = False) -> Selection:
    """Which rule each attention node would take, without building anything (peft's inspect_matched_modules)."""
    rules = as_rules(rules)
    views = attention_nodes(model)
    matched = select(model, rules, strict=strict)
    return Selection(views, {m.path: m for m in matched}, rules)
