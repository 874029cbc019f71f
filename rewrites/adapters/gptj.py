"""GPT-J and CodeGen: ``transformer.h.*.attn``, parallel block, RoPE on the first ``rotary_dim`` dims, interleaved.

GPT-J: separate ``q_proj``/``k_proj``/``v_proj`` and ``out_proj``, no biases. CodeGen fuses them
into ``qkv_proj`` in ``mp_num`` (4) model-parallel blocks, each ``[q | v | k]`` of ``d_model / mp_num``
rows (note the order); the module concatenates the blocks' q (and k, v) and splits heads after.
From transformers 5.24 both models compute the rotary table once and hand it to every block (as
``(sin, cos)``, one entry per rotated pair) and their attention calls the ``AttentionInterface``;
before (5.17) each attention computed it from ``position_ids`` and its own softmax: the adapter
asks the block's signature which convention it follows.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from surgery.mixers.base import AttentionShape, AttentionWeights

from .base import FamilyAdapter, PositionInfo, first_output, register_adapter, weights_from_rows


MP_NUM = 4  # CodeGen's model-parallel blocks (an attribute from 5.24, a constant in forward before)


@register_adapter("gptj")
class GPTJAdapter(FamilyAdapter):
    """``transformer.h.{i}.attn.{q,k,v,out}_proj``."""

    layers_path = "transformer.h"
    attention_name = "attn"
    o_name = "out_proj"
    embedding_paths = ("transformer.wte",)
    final_norm_path = "transformer.ln_f"

    @property
    def takes_position_embeddings(self) -> bool:  # type: ignore[override]
        _, layer = self.decoder_layers()[0]
        return "position_embeddings" in inspect.signature(layer.forward).parameters

    def call_layer(self, layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        kwargs = {"position_embeddings": position_embeddings} if self.takes_position_embeddings else {}
        return first_output(layer(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False, **kwargs))

    def position_info(self, layer_idx: int, shape: AttentionShape) -> PositionInfo:
        rotary = getattr(self.config, "rotary_dim", None) or shape.head_dim
        theta = (getattr(self.config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return PositionInfo(kind="rope", rope_theta=float(theta), rotary_dim=int(rotary), interleaved=True)


@register_adapter("codegen")
class CodeGenAdapter(GPTJAdapter):
    """``transformer.h.{i}.attn.{qkv_proj, out_proj}``; ``qkv_proj`` in ``mp_num`` blocks of ``[q | v | k]``."""

    def shape(self, attn: nn.Module) -> AttentionShape:
        d, hd = attn.qkv_proj.in_features, self.head_dim(attn)
        return AttentionShape(d_model=d, n_heads=d // hd, n_kv_heads=d // hd, head_dim=hd)

    def _blocks(self, attn: nn.Module) -> torch.Tensor:
        d = attn.qkv_proj.in_features
        mp = getattr(attn, "mp_num", MP_NUM)
        return attn.qkv_proj.weight.reshape(mp, 3, d // mp, d)  # (mp, [q|v|k], d/mp, d)

    def weights(self, attn: nn.Module) -> AttentionWeights:
        d = attn.qkv_proj.in_features
        w = self._blocks(attn)
        q, v, k = (w[:, i].reshape(d, d) for i in range(3))  # blocks concatenated: (mp * d/mp, d)
        return weights_from_rows(self.shape(attn), q, k, v, attn.out_proj.weight, (None, None, None, attn.out_proj.bias))

    def weight_sources(self, attn: nn.Module) -> dict[str, str]:
        mp = getattr(attn, "mp_num", MP_NUM)
        ld = attn.qkv_proj.in_features // mp
        at = {"q": 0, "v": 1, "k": 2}
        return {k: f"qkv_proj.weight[m*{3 * ld} + {i * ld}:+{ld}] (blocks m < {mp})" for k, i in at.items()} | {
            "o": "out_proj.weight"}
