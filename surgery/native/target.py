"""What an export target is, and the registry of targets (``@register_target``).

A target turns a loaded student (:class:`~surgery.native.source.Student`) into a native
checkpoint of one transformers architecture: :meth:`Target.mismatches` lists every way the
student cannot be expressed exactly (the export refuses when the list is not empty),
:meth:`Target.config` gives the native ``config.json`` and :meth:`Target.tensors` the
renamed / reshaped tensors. Nothing approximate is ever written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import SurgeryError, suggest

if TYPE_CHECKING:
    from .source import Student


class ExportError(SurgeryError):
    """The student cannot be exported exactly to the requested architecture (or the arguments are wrong)."""


class Target:
    """One native architecture a student can be exported to."""

    name: ClassVar[str] = ""
    model_type: ClassVar[str] = ""  # the config's model_type, e.g. "bamba"
    architecture: ClassVar[str] = ""  # the transformers causal-LM class, e.g. "BambaForCausalLM"

    def mismatches(self, student: Student) -> list[str]:
        """Every reason the student cannot be expressed exactly; empty when it can."""
        raise NotImplementedError

    def config(self, student: Student) -> dict[str, Any]:
        """Keyword arguments of the target's config class (only called when :meth:`mismatches` is empty)."""
        raise NotImplementedError

    def tensors(self, student: Student, config: Any) -> dict[str, torch.Tensor]:
        """The native state dict (names and layout of the target), from the student's tensors."""
        raise NotImplementedError

    def identity_layers(self, student: Student) -> list[int]:
        """Layers of the native model that compute the identity (added for the target's sake, not the student's)."""
        return []

    def notes(self, student: Student) -> list[str]:
        """Caveats for the model card and the log (e.g. what some serving engine does not implement)."""
        return []

    def min_transformers(self, student: Student) -> str:
        """The oldest transformers release whose implementation of the target computes this student exactly."""
        raise NotImplementedError


TARGETS: dict[str, type[Target]] = {}


def register_target(name: str) -> Callable[[type[Target]], type[Target]]:
    """Class decorator: register an export target under ``name`` (``surgery export --to NAME``)."""

    def wrap(cls: type[Target]) -> type[Target]:
        if name in TARGETS:
            raise ValueError(f"export target {name!r} is registered twice")
        cls.name = name
        TARGETS[name] = cls
        return cls

    return wrap


def get_target(name: str) -> Target:
    """The registered target ``name``; an :class:`ExportError` listing the targets otherwise."""
    from . import bamba  # noqa: F401 - registers the built-in target

    if name not in TARGETS:
        raise ExportError(f"unknown export target {name!r}{suggest(name, TARGETS)}; targets: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]()
