"""Persimmon: ``query_key_value`` interleaved per head (as GPT-NeoX), output ``dense``, q/k LayerNorm per head.

The module views the fused output as ``(..., n_heads, 3, head_dim)``, so the rows are
``[q_0 | k_0 | v_0 | q_1 | ...]``; biases on both projections; partial RoPE; final norm
``model.final_layernorm``; the Llama calling convention.
"""

from __future__ import annotations

from .base import register_adapter
from .gpt_neox import GPTNeoXAdapter


@register_adapter("persimmon")
class PersimmonAdapter(GPTNeoXAdapter):
    """``model.layers.{i}.self_attn.{query_key_value, dense}``, ``q_layernorm``/``k_layernorm`` over each head."""

    layers_path = "model.layers"
    attention_name = "self_attn"
    embedding_paths = ("model.embed_tokens",)
    final_norm_path = "model.final_layernorm"
