"""Llama-layout families: separate q/k/v/o ``nn.Linear`` projections under ``model.layers.*.self_attn``.

Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 and Gemma3 (per-head q_norm/k_norm
before RoPE), Gemma. GQA: ``k_proj``/``v_proj`` have ``n_kv_heads * head_dim``
rows. Gemma3 passes no ``use_cache`` to its layers and has per-layer-type RoPE
and sliding windows (handled by the base class from ``config.layer_types``).
"""

from __future__ import annotations

from .base import FamilyAdapter, register_adapter


@register_adapter("llama", "mistral", "qwen2", "qwen3", "gemma")
class LlamaAdapter(FamilyAdapter):
    """``model.layers.{i}.self_attn.{q,k,v,o}_proj``; final norm ``model.norm``."""


@register_adapter("gemma3_text")
class Gemma3Adapter(FamilyAdapter):
    """Gemma3: Llama layout; the model calls layers without ``use_cache``."""

    layer_kwargs: dict = {}  # Gemma3Model passes no use_cache
