"""The student being exported: loaded from its directory, with its mixers found by layer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..mixers import Mixer
from ..student.tensors import named_tensors


@dataclass
class Student:
    """A student directory loaded for export (:func:`read_student_dir`)."""

    path: Path
    model: nn.Module  # surgery.load(path): the stored dtypes, eval mode
    section: dict[str, Any]  # config.json's surgery section

    @property
    def config(self) -> Any:
        """The teacher family's config (``model.config``)."""
        return self.model.config

    @property
    def family(self) -> str:
        return self.config.model_type

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def mixers(self) -> dict[int, tuple[str, Mixer]]:
        """``{layer: (module path, mixer)}`` for every spliced-in mixer."""
        return {m.layer_idx: (path, m) for path, m in self.model.named_modules() if isinstance(m, Mixer)}

    @property
    def attention_layers(self) -> list[int]:
        """Layers whose attention was kept (or never selected)."""
        mixers = self.mixers
        return [i for i in range(self.n_layers) if i not in mixers]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by state-dict name, each once (tied aliases left out, as they are stored)."""
        return dict(named_tensors(self.model))


def read_student_dir(path: str | Path) -> Student:
    """Load ``path`` with :func:`surgery.load` (every check it makes; a :class:`StudentError` names what is wrong)."""
    from ..student import load

    path = Path(path)
    model = load(path)
    return Student(path=path, model=model, section=dict(model.config.surgery))
