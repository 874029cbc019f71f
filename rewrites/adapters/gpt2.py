"""GPT-2: fused, transposed ``Conv1D`` projections under ``transformer.h.*.attn``.

``c_attn.weight`` is ``(d_model, 3 * d_model)`` (in, out) and computes
``u @ W + b``; its columns are ``[q | k | v]``, each head-major
``(n_heads, head_dim)``. ``c_proj.weight`` is ``(d_model_in, d_model_out)``.
Learned absolute positions (``wpe``); the model passes the hidden states,
the cache and the mask to a block positionally.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.mixers.base import AttentionShape, AttentionWeights

from .base import FamilyAdapter, register_adapter


@register_adapter("gpt2")
class GPT2Adapter(FamilyAdapter):
    layers_path = "transformer.h"
    attention_name = "attn"
    embedding_paths = ("transformer.wte", "transformer.wpe")
    final_norm_path = "transformer.ln_f"
    positions = "learned"

    def shape(self, attn: nn.Module) -> AttentionShape:
        d = attn.c_attn.weight.shape[0]
        hd = self.head_dim(attn)
        return AttentionShape(d_model=d, n_heads=d // hd, n_kv_heads=d // hd, head_dim=hd)

    def weights(self, attn: nn.Module) -> AttentionWeights:
        s = self.shape(attn)
        h, p, d = s.n_heads, s.head_dim, s.d_model
        w = attn.c_attn.weight.detach()  # (d, 3*h*p): u @ w
        q, k, v = (w[:, i * h * p : (i + 1) * h * p].t().reshape(h, p, d) for i in range(3))  # (h*p, d) -> (h, p, d)
        b = attn.c_attn.bias.detach().reshape(3, h, p)
        o = attn.c_proj.weight.detach().t().reshape(d, h, p)  # (h*p, d)^T = (d, h*p) -> (d, h, p)
        return AttentionWeights(
            shape=s, q=q.clone(), k=k.clone(), v=v.clone(), o=o.clone(),
            q_bias=b[0].clone(), k_bias=b[1].clone(), v_bias=b[2].clone(), o_bias=attn.c_proj.bias.detach().clone(),
        )  # fmt: skip

    def weight_sources(self, attn: nn.Module) -> dict[str, str]:
        hp = self.shape(attn).n_heads * self.shape(attn).head_dim
        cols = {"q": f"[:, 0:{hp}]", "k": f"[:, {hp}:{2 * hp}]", "v": f"[:, {2 * hp}:{3 * hp}]"}
        out = {key: f"c_attn.weight{sl}.T" for key, sl in cols.items()}
        out |= {f"{key}_bias": f"c_attn.bias{sl[3:]}" for key, sl in cols.items()}
        return out | {"o": "c_proj.weight.T", "o_bias": "c_proj.bias"}

    def call_layer(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        # GPT2Model: block(hidden_states, past_key_values, causal_mask, encoder_hidden_states, ...)
        return layer(
            hidden_states, None, attention_mask, None,
            encoder_attention_mask=None, use_cache=False, position_ids=position_ids,
        )  # fmt: skip
