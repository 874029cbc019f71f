"""A Pydantic base that refuses ``true``/``false`` where a number is expected.

Pydantic's lax mode reads ``layers: true`` as layer 1 and ``D: false`` as 0.0; YAML makes such
slips easy. Fields whose type admits ``bool`` (or ``Any``) are left alone.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ValidationInfo, field_validator

_NUMBERS = (int, float)
_SEQUENCES = (list, tuple, set, frozenset)


def _members(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a union (``int | None`` -> ``(int, NoneType)``), else the annotation alone."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _expects_number(annotation: Any) -> bool:
    members = _members(annotation)
    return any(m in _NUMBERS for m in members) and bool not in members and Any not in members


def bool_for_number(annotation: Any, value: Any) -> bool:
    """Whether ``value`` puts a bool where ``annotation`` wants a number (also inside lists/tuples)."""
    if isinstance(value, bool):
        return _expects_number(annotation)
    if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
        elements = [e for m in _members(annotation) if typing.get_origin(m) in _SEQUENCES
                    for e in typing.get_args(m) if e is not Ellipsis]
        return any(_expects_number(e) for e in elements) and not any(e is bool or e is Any for e in elements)
    return False


class NumbersNotBools(BaseModel):
    """Base model: a bool given for a numeric field is an error, not 1 or 0."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and bool_for_number(field.annotation, value):
            raise ValueError("expected a number, not true/false")
        return value


__all__ = ["NumbersNotBools", "bool_for_number"]
