"""GPTBigCode (StarCoder 1, SantaCoder): GPT-2's block with an ``nn.Linear`` ``c_attn``, usually multi-query.

``multi_query=True``: ``c_attn`` rows are ``[q (h*p) | k (p) | v (p)]``, one K/V head shared by all
query heads. ``multi_query=False``: the module views the output as ``(..., n_heads, 3 * head_dim)``,
so the rows interleave ``[q_0 | k_0 | v_0 | q_1 | ...]``. Output ``c_proj``; biases everywhere;
learned positions (``wpe``); the model passes the cache to a block as ``layer_past``.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.mixers.base import AttentionShape, AttentionWeights

from .base import FamilyAdapter, first_output, register_adapter, weights_from_rows


@register_adapter("gpt_bigcode")
class GPTBigCodeAdapter(FamilyAdapter):
    """``transformer.h.{i}.attn.{c_attn, c_proj}``."""

    layers_path = "transformer.h"
    attention_name = "attn"
    o_name = "c_proj"
    embedding_paths = ("transformer.wte", "transformer.wpe")
    final_norm_path = "transformer.ln_f"
    positions = "learned"
    takes_position_embeddings = False

    def shape(self, attn: nn.Module) -> AttentionShape:
        d, hd = attn.c_attn.in_features, self.head_dim(attn)
        g = 1 if attn.multi_query else d // hd
        return AttentionShape(d_model=d, n_heads=d // hd, n_kv_heads=g, head_dim=hd)

    def _rows(self, attn: nn.Module, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.shape(attn)
        hp, p = s.n_heads * s.head_dim, s.head_dim
        if attn.multi_query:
            return t[:hp], t[hp : hp + p], t[hp + p :]
        per_head = t.reshape(s.n_heads, 3, p, *t.shape[1:])  # (3*h*p, ...) -> (h, [q|k|v], p, ...)
        return tuple(per_head[:, i].reshape(hp, *t.shape[1:]) for i in range(3))  # type: ignore[return-value]

    def weights(self, attn: nn.Module) -> AttentionWeights:
        q, k, v = self._rows(attn, attn.c_attn.weight)
        b = attn.c_attn.bias
        qb, kb, vb = self._rows(attn, b) if b is not None else (None, None, None)
        return weights_from_rows(self.shape(attn), q, k, v, attn.c_proj.weight, (qb, kb, vb, attn.c_proj.bias))

    def weight_sources(self, attn: nn.Module) -> dict[str, str]:
        s = self.shape(attn)
        hp, p = s.n_heads * s.head_dim, s.head_dim
        if attn.multi_query:
            rows = {"q": f"[0:{hp}]", "k": f"[{hp}:{hp + p}]", "v": f"[{hp + p}:{hp + 2 * p}]"}
        else:
            rows = {k: f" (head-interleaved, {k})" for k in "qkv"}
        out = {k: f"c_attn.weight{r}" for k, r in rows.items()} | {"o": "c_proj.weight"}
        if attn.c_attn.bias is not None:
            out |= {f"{k}_bias": f"c_attn.bias{r}" for k, r in rows.items()}
        if attn.c_proj.bias is not None:
            out["o_bias"] = "c_proj.bias"
        return out

    def call_layer(self, layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        # GPTBigCodeModel: block(hidden_states, encoder_hidden_states, layer_past=cache, attention_mask=..., ...)
        return first_output(layer(hidden_states, None, attention_mask=attention_mask, use_cache=False))
