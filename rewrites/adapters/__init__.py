"""Per-family attention adapters (see :mod:`rewrites.adapters.base`)."""

from .base import (
    ADAPTERS,
    AttentionView,
    FamilyAdapter,
    PositionInfo,
    UnsupportedModelError,
    get_adapter,
    register_adapter,
    supported_families,
)

__all__ = [
    "ADAPTERS",
    "AttentionView",
    "FamilyAdapter",
    "PositionInfo",
    "UnsupportedModelError",
    "get_adapter",
    "register_adapter",
    "supported_families",
]
