"""Resumable training state, written atomically as safetensors + JSON (no pickle).

A checkpoint directory holds ``student.safetensors`` (every student tensor),
``optimizer.safetensors`` + the optimizer's JSON-able hyper-parameters, and
``state.json`` (stage, step, data cursor, measurements so far). It is written
to a temporary directory and renamed into place, so the previous checkpoint
stays valid until the new one is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from surgery.errors import TrainingError
from surgery.io import atomic_dir

STATE = "state.json"
STUDENT = "student.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"


def optimizer_tensors(
    optimizer: torch.optim.Optimizer | dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict (or the optimizer's own) into tensors (for safetensors) and JSON."""
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_tensors`; a sharded (FSDP2) parameter gets its shard of each full tensor."""
    from .fsdp import shard_like

    params = [p for group in optimizer.param_groups for p in group["params"]]  # state-dict index order
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = shard_like(value, params[int(index)])
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]  # JSON lists
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    directory: str | Path,
    student: nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
) -> None:
    """Write a complete checkpoint atomically (replacing the previous one); ``optimizer`` may be its state dict."""
    with atomic_dir(directory, overwrite=True) as tmp:
        save_model(student, str(tmp / STUDENT))
        if optimizer is not None:
            tensors, meta = optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER))
            (tmp / OPTIMIZER_META).write_text(json.dumps(meta))
        (tmp / STATE).write_text(json.dumps(state, indent=1))


def read_state(directory: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint."""
    path = Path(directory) / STATE
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {directory} (missing {STATE})")
    return json.loads(path.read_text())


def load_student(directory: str | Path, student: nn.Module) -> None:
    """Load the checkpoint's student tensors into ``student`` (strict)."""
    missing, unexpected = load_model(student, str(Path(directory) / STUDENT), strict=False)
    if missing or unexpected:
        raise TrainingError(
            f"checkpoint {directory} does not fit this student (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
            "was the recipe changed? use --restart to start over"
        )


def load_optimizer(directory: str | Path, optimizer: torch.optim.Optimizer) -> bool:
    """Restore optimizer state if the checkpoint has one; returns whether it did."""
    directory = Path(directory)
    if not (directory / OPTIMIZER).is_file():
        return False
    meta = json.loads((directory / OPTIMIZER_META).read_text())
    restore_optimizer(optimizer, load_file(str(directory / OPTIMIZER)), meta)
    return True
