"""Phi (1, 1.5, 2): Llama-style separate projections, output projection ``dense``.

Parallel block (``x + attn(LN(x)) + mlp(LN(x))``), partial RoPE
(``partial_rotary_factor``), biases on every projection, optional
``q_layernorm``/``k_layernorm``; final norm ``model.final_layernorm``.
"""

from __future__ import annotations

from .base import FamilyAdapter, register_adapter


@register_adapter("phi")
class PhiAdapter(FamilyAdapter):
    o_name = "dense"
    final_norm_path = "model.final_layernorm"
