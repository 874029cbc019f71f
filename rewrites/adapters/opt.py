"""OPT: separate projections under ``model.decoder.layers.*.self_attn``, output ``out_proj``.

Learned absolute positions (``embed_positions``), no RoPE and no
``position_embeddings`` argument. OPT multiplies the query projection by
``head_dim**-0.5`` inside the module; the common layout holds the raw
``q_proj`` weights (the scale is a property of the attention, not of W_Q).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import FamilyAdapter, register_adapter


@register_adapter("opt")
class OPTAdapter(FamilyAdapter):
    layers_path = "model.decoder.layers"
    o_name = "out_proj"
    embedding_paths = ("model.decoder.embed_tokens", "model.decoder.embed_positions")
    final_norm_path = "model.decoder.final_layer_norm"
    positions = "learned"

    def call_layer(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        return layer(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=None,
            use_cache=False,
        )
