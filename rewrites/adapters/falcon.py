"""Falcon: ``transformer.h.*.self_attention.{query_key_value, dense}``, in three layouts of the fused rows.

* ``new_decoder_architecture`` (Falcon 40B/180B, Falcon 2): per K/V group ``[q x (h/g) | k | v]``,
  ``head_dim`` rows each, so the rows are ``(g, h/g + 2, p)``;
* ``multi_query`` (Falcon 7B): ``[q (h*p) | k (p) | v (p)]``, one K/V head;
* neither: per head ``[q_i | k_i | v_i]``, rows ``(h, 3, p)``.

RoPE over the whole head; ``bias`` on both projections or neither. ALiBi variants (``alibi=True``,
Falcon-RW) are refused: the model folds ALiBi into the attention mask it hands every layer, which
the mixers would read as padding. Falcon's attention computes the softmax itself (no
``AttentionInterface``), so stage 1 replays the eager attention.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.mixers.base import AttentionShape, AttentionWeights

from .base import FamilyAdapter, first_output, register_adapter, weights_from_rows


@register_adapter("falcon")
class FalconAdapter(FamilyAdapter):
    """``transformer.h.{i}.self_attention.{query_key_value, dense}``."""

    layers_path = "transformer.h"
    attention_name = "self_attention"
    o_name = "dense"
    embedding_paths = ("transformer.word_embeddings",)
    final_norm_path = "transformer.ln_f"

    def refusal(self) -> str | None:
        if getattr(self.config, "alibi", False):
            return ("alibi=True (Falcon-RW) adds ALiBi biases to the attention mask every layer receives, so a mixer "
                    "would read them as padding; supporting it needs the adapter to hand mixers the plain mask")
        return None

    def _layout(self) -> str:
        if self.config.new_decoder_architecture:
            return "grouped"
        return "multi_query" if self.config.multi_query else "per_head"

    def shape(self, attn: nn.Module) -> AttentionShape:
        d, h = self.config.hidden_size, self.config.num_attention_heads
        g = {"grouped": self.config.num_kv_heads, "multi_query": 1, "per_head": h}[self._layout()]
        return AttentionShape(d_model=d, n_heads=h, n_kv_heads=g, head_dim=d // h)

    def _rows(self, t: torch.Tensor, s: AttentionShape) -> tuple[torch.Tensor, ...]:
        h, g, p = s.n_heads, s.n_kv_heads, s.head_dim
        rest = t.shape[1:]
        layout = self._layout()
        if layout == "grouped":
            blocks = t.reshape(g, h // g + 2, p, *rest)  # (g, [q x h/g | k | v], p, ...)
            return (blocks[:, :-2].reshape(h * p, *rest), blocks[:, -2].reshape(g * p, *rest),
                    blocks[:, -1].reshape(g * p, *rest))
        if layout == "multi_query":
            return t[: h * p], t[h * p : h * p + p], t[h * p + p :]
        per_head = t.reshape(h, 3, p, *rest)  # (h, [q|k|v], p, ...)
        return tuple(per_head[:, i].reshape(h * p, *rest) for i in range(3))

    def weights(self, attn: nn.Module) -> AttentionWeights:
        s = self.shape(attn)
        q, k, v = self._rows(attn.query_key_value.weight, s)
        b = attn.query_key_value.bias
        qb, kb, vb = self._rows(b, s) if b is not None else (None, None, None)
        return weights_from_rows(s, q, k, v, attn.dense.weight, (qb, kb, vb, attn.dense.bias))

    def weight_sources(self, attn: nn.Module) -> dict[str, str]:
        layout = self._layout()
        out = {k: f"query_key_value.weight ({layout} layout, {k})" for k in "qkv"} | {"o": "dense.weight"}
        if attn.query_key_value.bias is not None:
            out |= {f"{k}_bias": f"query_key_value.bias ({layout} layout, {k})" for k in "qkv"}
        if attn.dense.bias is not None:
            out["o_bias"] = "dense.bias"
        return out

    def call_layer(self, layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        # FalconModel: block(hidden_states, layer_past=cache, attention_mask=..., position_ids=..., alibi=alibi, ...)
        return first_output(layer(hidden_states, alibi=None, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False, position_embeddings=position_embeddings))
