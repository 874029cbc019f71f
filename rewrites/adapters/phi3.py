"""Phi-3: Llama layout with one fused ``qkv_proj``; rows ``[q (h*p) | k (g*p) | v (g*p)]`` (GQA), output ``o_proj``.

Partial RoPE (``partial_rotary_factor``) and per-layer-type sliding windows come from the config
(the base class); no biases.
"""

from __future__ import annotations

from torch import nn

from surgery.mixers.base import AttentionShape, AttentionWeights

from .base import FamilyAdapter, register_adapter, weights_from_rows


@register_adapter("phi3")
class Phi3Adapter(FamilyAdapter):
    """``model.layers.{i}.self_attn.{qkv_proj, o_proj}``."""

    def shape(self, attn: nn.Module) -> AttentionShape:
        hd = self.head_dim(attn)
        h = attn.o_proj.in_features // hd
        g = (attn.qkv_proj.out_features - h * hd) // (2 * hd)
        return AttentionShape(d_model=attn.qkv_proj.in_features, n_heads=h, n_kv_heads=g, head_dim=hd)

    def weights(self, attn: nn.Module) -> AttentionWeights:
        s = self.shape(attn)
        hp, gp = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        w = attn.qkv_proj.weight  # (h*p + 2*g*p, d)
        return weights_from_rows(s, w[:hp], w[hp : hp + gp], w[hp + gp :], attn.o_proj.weight,
                                 (None, None, None, attn.o_proj.bias))

    def weight_sources(self, attn: nn.Module) -> dict[str, str]:
        s = self.shape(attn)
        hp, gp = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        return {"q": f"qkv_proj.weight[0:{hp}]", "k": f"qkv_proj.weight[{hp}:{hp + gp}]",
                "v": f"qkv_proj.weight[{hp + gp}:{hp + 2 * gp}]", "o": "o_proj.weight"}
