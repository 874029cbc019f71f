"""Llama-layout families: separate q/k/v/o ``nn.Linear`` projections under ``model.layers.*.self_attn``.

GQA everywhere: ``k_proj``/``v_proj`` have ``n_kv_heads * head_dim`` rows. What each family adds to
Llama's attention, and how it is handled (the mixers replace the whole attention, so the teacher's
positional scheme, norms and logit tricks matter to the transfer only through q/k/v/o, and to stage 1
through the recorded attention, which runs the teacher's own code):

* biases on q/k/v (Qwen2, Qwen2-MoE, GLM, StableLM ``use_qkv_bias``) or on all four (StarCoder2):
  read into :class:`~surgery.mixers.base.AttentionWeights` and transferred;
* per-head q/k norms before RoPE (Qwen3, Qwen3-MoE, Gemma3, Cohere ``use_qk_norm``, StableLM
  ``qk_layernorm``) or one norm over all heads (OLMo2, OLMo3): reported by ``qk_norm_scope``;
* partial RoPE (StableLM, Nemotron, GLM): ``PositionInfo.rotary_dim``; interleaved RoPE (Cohere,
  GLM): ``PositionInfo.interleaved``; layers without RoPE (SmolLM3 ``no_rope_layers``): kind ``none``;
* sliding windows per layer type (Gemma2, Gemma3, OLMo3, Mistral, Mixtral): from ``config.layer_types``;
* attention soft-capping (Gemma2), a scale other than ``head_dim**-0.5`` (Granite
  ``attention_multiplier``, Gemma2 ``query_pre_attn_scalar``) and q/k/v clipping (OLMo ``clip_qkv``)
  live inside the teacher's attention call; stage 1 replays that call where it is not a plain softmax;
* mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE) sit beside the attention and are kept.
"""

from __future__ import annotations

from typing import Any

from surgery.mixers.base import AttentionShape

from .base import FamilyAdapter, PositionInfo, register_adapter


@register_adapter(
    "llama", "mistral", "qwen2", "qwen3", "gemma",
    "starcoder2", "olmo", "olmo2", "olmo3", "stablelm", "granite", "gemma2",
    "mixtral", "qwen2_moe", "qwen3_moe", "nemotron", "helium",
)  # fmt: skip
class LlamaAdapter(FamilyAdapter):
    """``model.layers.{i}.self_attn.{q,k,v,o}_proj``; final norm ``model.norm``."""


@register_adapter("gemma3_text")
class Gemma3Adapter(FamilyAdapter):
    """Gemma3: Llama layout; the model calls layers without ``use_cache``."""

    layer_kwargs: dict = {}  # Gemma3Model passes no use_cache


@register_adapter("cohere", "glm")
class InterleavedRopeAdapter(FamilyAdapter):
    """Cohere and GLM: Llama layout, RoPE rotating interleaved pairs ``(x0, x1), (x2, x3), ...``."""

    def position_info(self, layer_idx: int, shape: AttentionShape) -> PositionInfo:
        info = super().position_info(layer_idx, shape)
        return PositionInfo(info.kind, info.rope_theta, info.rotary_dim, info.rope_type, interleaved=True)


@register_adapter("smollm3")
class SmolLM3Adapter(FamilyAdapter):
    """SmolLM3: Llama layout; the layers where ``config.no_rope_layers[i] == 0`` use no positions (NoPE)."""

    def position_info(self, layer_idx: int, shape: AttentionShape) -> PositionInfo:
        flags: list[Any] = list(getattr(self.config, "no_rope_layers", None) or [])
        if layer_idx < len(flags) and not flags[layer_idx]:
            return PositionInfo(kind="none")
        return super().position_info(layer_idx, shape)
