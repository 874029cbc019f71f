"""GPT-Neo: ``transformer.h.*.attn.attention.{q,k,v,out}_proj``; learned positions; alternating local windows.

The attention node is ``attn.attention`` (``GPTNeoSelfAttention``; ``attn`` is a thin wrapper).
q/k/v have no biases, ``out_proj`` has one; GPT-Neo does not scale its attention scores (the
teacher's own attention call carries that, and stage 1 replays it). ``config.attention_layers[i]``
is ``"local"`` for the layers with a sliding window of ``config.window_size``. Its attention
computes the softmax itself (no ``AttentionInterface``), so stage 1 replays the eager attention.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import FamilyAdapter, first_output, register_adapter


@register_adapter("gpt_neo")
class GPTNeoAdapter(FamilyAdapter):
    """``transformer.h.{i}.attn.attention.{q,k,v,out}_proj``."""

    layers_path = "transformer.h"
    attention_name = "attn.attention"
    o_name = "out_proj"
    embedding_paths = ("transformer.wte", "transformer.wpe")
    final_norm_path = "transformer.ln_f"
    positions = "learned"
    takes_position_embeddings = False

    def sliding_window(self, layer_idx: int) -> int | None:
        kinds = getattr(self.config, "attention_layers", None) or []
        return int(self.config.window_size) if layer_idx < len(kinds) and kinds[layer_idx] == "local" else None

    def call_layer(self, layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        # GPTNeoModel: block(hidden_states, layer_past=cache, attention_mask=..., use_cache=..., output_attentions=...)
        return first_output(layer(hidden_states, attention_mask=attention_mask, use_cache=False))
