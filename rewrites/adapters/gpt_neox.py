"""GPT-NeoX (Pythia): fused ``query_key_value`` interleaved per head, output ``dense``.

``query_key_value.weight`` is ``(3 * d_model, d_model)``; the module views its
output as ``(..., n_heads, 3 * head_dim)`` and chunks the last dim, so the rows
are ``[q_0 | k_0 | v_0 | q_1 | k_1 | v_1 | ...]``, one ``head_dim`` block each.
Partial RoPE (``rotary_pct``); the cache argument is named ``layer_past``.
"""

from __future__ import annotations

from torch import nn

from surgery.mixers.base import AttentionShape, AttentionWeights

from .base import FamilyAdapter, register_adapter


@register_adapter("gpt_neox")
class GPTNeoXAdapter(FamilyAdapter):
    layers_path = "gpt_neox.layers"
    attention_name = "attention"
    o_name = "dense"
    embedding_paths = ("gpt_neox.embed_in",)
    final_norm_path = "gpt_neox.final_layer_norm"

    def shape(self, attn: nn.Module) -> AttentionShape:
        d = attn.query_key_value.in_features
        hd = self.head_dim(attn)
        return AttentionShape(d_model=d, n_heads=d // hd, n_kv_heads=d // hd, head_dim=hd)

    def weights(self, attn: nn.Module) -> AttentionWeights:
        s = self.shape(attn)
        h, p, d = s.n_heads, s.head_dim, s.d_model
        w = attn.query_key_value.weight.detach().reshape(h, 3, p, d)  # (3*h*p, d) -> (h, [q|k|v], p, d)
        qkv_b = attn.query_key_value.bias
        b = None if qkv_b is None else qkv_b.detach().reshape(h, 3, p)  # (h, [q|k|v], p)
        o = attn.dense.weight.detach().reshape(d, h, p)  # (d, h*p) -> (d, h, p)
        ob = attn.dense.bias
        return AttentionWeights(
            shape=s,
            q=w[:, 0].clone(), k=w[:, 1].clone(), v=w[:, 2].clone(), o=o.clone(),
            q_bias=None if b is None else b[:, 0].clone(),
            k_bias=None if b is None else b[:, 1].clone(),
            v_bias=None if b is None else b[:, 2].clone(),
            o_bias=None if ob is None else ob.detach().clone(),
        )  # fmt: skip

    def weight_sources(self, attn: nn.Module) -> dict[str, str]:
        out = {
            "q": "query_key_value.weight[h*3p + 0:p] (per head h)",
            "k": "query_key_value.weight[h*3p + p:2p] (per head h)",
            "v": "query_key_value.weight[h*3p + 2p:3p] (per head h)",
            "o": "dense.weight",
        }
        if attn.query_key_value.bias is not None:
            out |= {f"{k}_bias": f"query_key_value.bias (head-interleaved, {k})" for k in "qkv"}
        if attn.dense.bias is not None:
            out["o_bias"] = "dense.bias"
        return out

    layer_kwargs = {"use_cache": False}
