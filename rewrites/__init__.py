"""Rewrite rules (attention -> SSM mixer, keep) and per-family attention adapters."""

from .registry import RULES, RuleSpec, get_rule, register_rule, validate_rule_options

__all__ = ["RULES", "RuleSpec", "get_rule", "register_rule", "validate_rule_options"]
