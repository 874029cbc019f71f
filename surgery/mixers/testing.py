"""A naive splice for tests and benchmarks of the mixers (the real rewriter is ``surgery.rewrite``).

Finds each decoder layer's attention module (a direct child whose class name ends in
``Attention``; layer index = position in the model's layer list), builds a mixer from the
teacher config's head geometry and ``setattr``s it on the layer. No weight transfer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import get_mixer
from .base import AttentionShape, Mixer


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list: the first ModuleList whose items each hold an ``*Attention`` child."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_attention_name(m) for m in module):
            return module
    raise ValueError(f"no decoder layer list with attention modules found in {type(model).__name__}")


def _attention_name(layer: nn.Module) -> str | None:
    for name, child in layer.named_children():
        if type(child).__name__.endswith("Attention") or isinstance(child, Mixer):
            return name
    return None


def attention_shape(model: nn.Module) -> AttentionShape:
    """Head geometry of the model's attention (from its config)."""
    cfg = model.config.get_text_config(decoder=True)
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    return AttentionShape(d_model=cfg.hidden_size, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim)


def naive_student(
    teacher: nn.Module,
    mixer: str = "discrete_mamba2",
    layers: Iterable[int] | None = None,
    params: dict[str, Any] | None = None,
    init: dict[str, Any] | None = None,
    seed: int = 0,
    copy_model: bool = True,
) -> nn.Module:
    """A student with ``mixer`` in place of the attention of ``layers`` (all when None)."""
    model = copy.deepcopy(teacher) if copy_model else teacher
    cls = get_mixer(mixer)
    shape = attention_shape(model)
    chosen = None if layers is None else set(layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for idx, layer in enumerate(layer_list(model)):
            if chosen is not None and idx not in chosen:
                continue
            name = _attention_name(layer)
            resolved = cls.resolve_params(cls.params_model(**(params or {})), shape)
            module = cls(shape.d_model, resolved, idx)
            module.init_from_attention(None, cls.init_model(**(init or {})))
            ref = next(layer.parameters())
            setattr(layer, name, module.to(device=ref.device, dtype=ref.dtype))
    return model
