"""Which tensors of a model are stored: state-dict order, each tensor object once, tied names as aliases."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import StudentError
from .dtypes import dtype_name


def _state_objects(model: nn.Module) -> list[tuple[str, torch.Tensor | None]]:
    """Each state-dict key (in order) with its parameter or buffer object (None when it maps to neither)."""
    keys = list(model.state_dict(keep_vars=True).keys())
    objects = dict(model.named_parameters(remove_duplicate=False))
    objects.update(model.named_buffers(remove_duplicate=False))
    return [(key, objects.get(key)) for key in keys]


def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Persistent parameters and buffers in ``state_dict`` order, each object once (tied names dropped)."""
    seen: set[int] = set()
    out = []
    for key, tensor in _state_objects(model):
        if tensor is None:  # a module with a custom state dict: not expected in decoder LMs
            raise StudentError(f"cannot map state-dict key {key!r} to a parameter or buffer of the model")
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out.append((key, tensor))
    return out


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for state-dict names that are the same tensor object (tied weights)."""
    first: dict[int, str] = {}
    aliases = {}
    for key, tensor in _state_objects(model):
        if tensor is None:
            continue
        if id(tensor) in first:
            aliases[key] = first[id(tensor)]
        else:
            first[id(tensor)] = key
    return aliases


def main_dtype(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[torch.dtype, dict[str, str]]:
    """The floating dtype holding most elements, and ``{name: dtype}`` for floating tensors that differ."""
    counts: dict[torch.dtype, int] = {}
    items = list(tensors)
    for _, t in items:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    main = max(counts, key=counts.__getitem__) if counts else torch.float32
    others = {name: dtype_name(t.dtype) for name, t in items if t.is_floating_point() and t.dtype != main}
    return main, others
