"""OPT: separate projections under ``model.decoder.layers.*.self_attn``, output ``out_proj``.

Learned absolute positions (``embed_positions``), no RoPE and no
``position_embeddings`` argument. OPT multiplies the query projection by
``head_dim**-0.5`` inside the module; the common layout holds the raw
``q_proj`` weights (the scale is a property of the attention, not of W_Q).
"""

from __future__ import annotations

from .base import FamilyAdapter, register_adapter


@register_adapter("opt")
class OPTAdapter(FamilyAdapter):
    layers_path = "model.decoder.layers"
    o_name = "out_proj"
    embedding_paths = ("model.decoder.embed_tokens", "model.decoder.embed_positions")
    final_norm_path = "model.decoder.final_layer_norm"
    positions = "learned"

    takes_position_embeddings = False  # learned positions: no (cos, sin) argument
