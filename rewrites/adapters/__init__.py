"""Per-family attention adapters (see :mod:`rewrites.adapters.base`)."""

from .base import (
    ADAPTERS,
    ENTRY_POINT_GROUP,
    REFUSED,
    AttentionView,
    FamilyAdapter,
    PositionInfo,
    UnsupportedModelError,
    first_output,
    get_adapter,
    refusal,
    register_adapter,
    supported_families,
    unsupported_message,
    weights_from_rows,
)

__all__ = [
    "ADAPTERS",
    "ENTRY_POINT_GROUP",
    "REFUSED",
    "AttentionView",
    "FamilyAdapter",
    "PositionInfo",
    "UnsupportedModelError",
    "first_output",
    "get_adapter",
    "refusal",
    "register_adapter",
    "supported_families",
    "unsupported_message",
    "weights_from_rows",
]
