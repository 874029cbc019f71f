"""Registry of rewrite rules: what a ``replace:`` rule's ``mixer:`` name does.

Each rule registers a builder with Pydantic models for its ``params`` and
``init`` options::

    @register_rule("discrete_mamba2", params=DiscreteMamba2Params, init=DiscreteMamba2Init,
                   description="attention -> discrete Mamba-2 (Phi-Mamba / Llamba)")
    def build(view: AttentionView, params, init) -> tuple[nn.Module, dict[str, str]]:
        ...  # returns the new module and a transfer record {target: source}

The recipe validates ``params``/``init`` against these models before anything
runs (:func:`validate_rule_options`). So that this needs no torch, the built-in rules'
models are also declared in :mod:`rewrites.rule_options` (torch-free,
:func:`declare_rule_options`); :func:`rule_options` looks there before it loads the
rules themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class RuleSpec:
    """A registered rewrite rule."""

    name: str
    params_model: type[BaseModel]
    init_model: type[BaseModel]
    build: Callable[..., Any]
    description: str
    replaces: bool  # False for rules that keep the teacher module (``keep``)


RULES: dict[str, RuleSpec] = {}


@dataclass(frozen=True)
class RuleOptions:
    """What a recipe needs to check a rule: its option models, and whether it replaces the node."""

    params_model: type[BaseModel]
    init_model: type[BaseModel]
    replaces: bool


DECLARED: dict[str, RuleOptions] = {}  # torch-free declarations (rewrites.rule_options)


def declare_rule_options(
    name: str, *, params: type[BaseModel], init: type[BaseModel], replaces: bool = True
) -> None:
    """Declare rule ``name``'s option models without importing its builder (nor torch)."""
    DECLARED[name] = RuleOptions(params, init, replaces)


def register_rule(
    name: str,
    *,
    params: type[BaseModel],
    init: type[BaseModel],
    description: str,
    replaces: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``build(view, params, init)`` as rule ``name``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in RULES and RULES[name].build is not fn:
            raise ValueError(f"rewrite rule {name!r} is registered twice")
        RULES[name] = RuleSpec(name, params, init, fn, description, replaces)
        return fn

    return decorate


_builtins_loaded = False


def _load_builtin_rules() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import importlib

    try:
        importlib.import_module("rewrites.rules")
    except ModuleNotFoundError as err:  # rules not written yet
        if err.name != "rewrites.rules":
            raise


def get_rule(name: str) -> RuleSpec:
    """The rule registered as ``name``; ``KeyError`` naming the known rules otherwise."""
    from surgery.errors import suggest

    _load_builtin_rules()
    if name not in RULES:
        raise KeyError(f"unknown mixer {name!r}{suggest(name, RULES)}; known: {', '.join(sorted(RULES)) or 'none'}")
    return RULES[name]


def rule_options(name: str) -> RuleOptions:
    """The option models of rule ``name``: registered rules first, then torch-free declarations, then the
    built-in rules are loaded; ``KeyError`` naming the known rules otherwise."""
    if name in RULES:
        spec = RULES[name]
        return RuleOptions(spec.params_model, spec.init_model, spec.replaces)
    import importlib

    importlib.import_module("rewrites.rule_options")
    if name in DECLARED:
        return DECLARED[name]
    spec = get_rule(name)
    return RuleOptions(spec.params_model, spec.init_model, spec.replaces)


def _first_error(err: ValidationError, field: str) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"{field}.{loc}: unknown option")
        else:
            parts.append(f"{field}.{loc}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def validate_rule_options(name: str, params: dict[str, Any], init: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate a rule's ``params``/``init`` dicts; returns them with defaults filled in.

    Raises ``ValueError`` (which Pydantic reports under the rule's path) naming the bad option.
    """
    try:
        spec = rule_options(name)
    except KeyError as err:
        raise ValueError(f"mixer: {err.args[0]}") from None
    try:
        p = spec.params_model.model_validate(params)
    except ValidationError as err:
        allowed = ", ".join(spec.params_model.model_fields) or "none"
        raise ValueError(f"{_first_error(err, 'params')} (mixer {name!r} takes: {allowed})") from None
    try:
        i = spec.init_model.model_validate(init)
    except ValidationError as err:
        allowed = ", ".join(spec.init_model.model_fields) or "none"
        raise ValueError(f"{_first_error(err, 'init')} (mixer {name!r} takes: {allowed})") from None
    return p.model_dump(mode="json"), i.model_dump(mode="json")
