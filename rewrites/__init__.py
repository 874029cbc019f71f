"""Rewrite rules (attention -> SSM mixer, keep) and per-family attention adapters."""

from .registry import (
    RULES,
    RuleOptions,
    RuleSpec,
    declare_rule_options,
    get_rule,
    register_rule,
    rule_options,
    validate_rule_options,
)

__all__ = [
    "RULES",
    "RuleOptions",
    "RuleSpec",
    "declare_rule_options",
    "get_rule",
    "register_rule",
    "rule_options",
    "validate_rule_options",
]
