"""Resolving a model reference for generate / eval: a student directory, or else any teacher reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layout import CONFIG, WEIGHTS, is_student_dir
from .loading import load
from .tokenizer import load_tokenizer


@dataclass
class LoadedModel:
    """A model reference resolved for generate / eval: a student directory or a teacher reference."""

    model: nn.Module
    tokenizer: Any
    kind: str  # 'student' | 'teacher'
    ref: str


def load_model_ref(ref: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """A student directory (config.json with a surgery section) or any teacher reference
    (``builtin:smollm2-135m``, ``random:llama``, a local Hugging Face directory, a hub id)."""
    path = Path(ref).expanduser()
    if is_student_dir(path) or (path.is_dir() and not (path / CONFIG).exists() and (path / WEIGHTS).exists()):
        model = load(path, device=device, dtype=dtype)
        return LoadedModel(model, load_tokenizer(path), "student", ref)
    from ..teacher import (
        load_teacher,  # only for teacher references (its import is the slow part of a CLI start)
    )

    teacher = load_teacher(ref, device=device, dtype=dtype, progress=False)
    return LoadedModel(teacher.model, teacher.tokenizer, "teacher", ref)
