"""The block shared by the structured mixers (``toeplitz``, ``low_rank``, ``semiseparable``).

Per head ``h`` (head dim ``p``)::

    x = x_proj(u)                                   (b, L, h, p), zero on padding
    y = M x                                          the family's causal mixing matrix M (b, h, L, L)
    out = out_proj(y * silu(z_proj(u) + z_bias))     an output gate, opened at init

No short conv on ``x``: the families differ only in the structure of ``M``, which is what MOHAWK's
ablation compares (Bick et al. 2024, arXiv 2408.10189, Tables 3-4). A subclass builds what makes
``M`` and implements :meth:`GatedHeads.core` (``y`` and the recurrent state from ``x``) and
:meth:`GatedHeads.materialize`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..mixer_options.structured import GatedHeadsInit, GatedHeadsParams
from ._common import GATE_OPEN_BIAS, name_modules, transfer_heads, transfer_out
from .base import AttentionShape, AttentionWeights, Mixer, MixerInit, MixerParams


def resolve_b_heads(n_heads: int, n_b_heads: int | None, shape: AttentionShape) -> int:
    """B heads default: the teacher's KV heads (B per KV group) when the mixer has the teacher's query heads."""
    if n_b_heads is not None:
        return n_b_heads
    return shape.n_kv_heads if n_heads == shape.n_heads and n_heads % shape.n_kv_heads == 0 else n_heads


class GatedHeads(Mixer):
    """Base of the structured mixers (see the module docstring); not registered itself."""

    def __init__(self, d_model: int, params: GatedHeadsParams | dict[str, Any], layer_idx: int) -> None:
        super().__init__(d_model, params, layer_idx)
        p = self.resolved()
        self.h, self.p = p.n_heads, p.head_dim
        self.d_inner = self.h * self.p
        self.x_proj = nn.Linear(d_model, self.d_inner, bias=p.bias)
        self.z_proj = nn.Linear(d_model, self.d_inner, bias=p.bias)
        self.z_bias = nn.Parameter(torch.zeros(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=p.bias)
        name_modules(self)  # subclasses call it again after adding their projections

    @classmethod
    def resolve_heads(cls, params: MixerParams, shape: AttentionShape) -> dict[str, Any]:
        """``params`` as a dict with ``n_heads`` / ``head_dim`` filled from the teacher."""
        raw = params.model_dump()
        raw["n_heads"] = raw.get("n_heads") or shape.n_heads
        raw["head_dim"] = raw.get("head_dim") or shape.head_dim
        return raw

    # ------------------------------------------------------------------ what subclasses provide

    def core(
        self, u: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None, state: torch.Tensor | None, keep: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``y = M x`` continuing from ``state``: u (b, L, d), x (b, L, h, p) -> y (b, L, h, p), new state
        (None allowed when ``keep`` is False: nobody stores it)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the block

    def x_inputs(self, u: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """u (b, L, d) -> x (b, L, h, p), zero on padding."""
        b, L, _ = u.shape
        x = self.x_proj(u)  # (b, L, h p)
        if valid is not None:
            x = x * valid[..., None]
        return x.reshape(b, L, self.h, self.p)

    def ssm_output(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x_inputs(u, mask)
        return x, self.core(u, x, mask, None, False)[0]

    def mix(self, u: torch.Tensor, mask: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        b, L, _ = u.shape
        slot = self.state_slot(cache, L)
        x = self.x_inputs(u, mask)  # (b, L, h, p)
        y, state = self.core(u, x, mask, slot.ssm_state if slot is not None else None, slot is not None)
        if slot is not None and state is not None:
            slot.store(state, None, L)
        gate = F.silu(self.z_proj(u) + self.z_bias)  # (b, L, h p)
        return self.out_proj(y.reshape(b, L, self.d_inner) * gate)

    @property
    def n_matrix_heads(self) -> int:
        return self.h

    # ------------------------------------------------------------------ transfer

    def transfer_targets(self) -> dict[str, tuple[nn.Linear, tuple[str, int], tuple[str, int], str, str]]:
        """``{init flag: (projection, (count param, value), (dim param, value), "q" | "kv", teacher tensor)}``."""
        return {"v_to_x": (self.x_proj, ("n_heads", self.h), ("head_dim", self.p), "kv", "v")}

    def weight_views(self) -> dict[str, torch.Tensor]:
        d = self.d_model
        return {"x": self.x_proj.weight.view(self.h, self.p, d), "out": self.out_proj.weight.view(d, self.h, self.p)}

    @torch.no_grad()
    def init_from_attention(self, weights: AttentionWeights | None, init: MixerInit) -> dict[str, str]:
        init = init if isinstance(init, self.init_model) else self.init_model.model_validate(init.model_dump())
        record: dict[str, str] = {}
        self.requested_transfers(weights, init)
        if weights is not None:
            if weights.shape.d_model != self.d_model:
                raise ValueError(f"{self.name}: teacher d_model {weights.shape.d_model} != mixer d_model {self.d_model}")
            s = weights.shape
            teacher = (s.n_heads, s.n_kv_heads, s.head_dim)
            for flag, (proj, count, dim, kind, src) in self.transfer_targets().items():
                if getattr(init, flag, False):
                    bias = getattr(weights, f"{src}_bias")
                    key, text = transfer_heads(self.name, flag, proj, count, dim, getattr(weights, src), bias, teacher, kind, src)
                    record[key] = text
            if getattr(init, "o_to_out", False):
                key, text = transfer_out(self.name, self.out_proj, self.h, self.p, weights.o, weights.o_bias)
                record[key] = text
        if isinstance(init, GatedHeadsInit) and init.open_gate:
            self.z_proj.weight.zero_()
            if self.z_proj.bias is not None:
                self.z_proj.bias.zero_()
            self.z_bias.fill_(GATE_OPEN_BIAS)
            record["z_proj, z_bias"] = f"open gate (0, {GATE_OPEN_BIAS})"
        record.update(self.init_matrix(init))
        return record

    def init_matrix(self, init: MixerInit) -> dict[str, str]:
        """Family-specific init of the matrix parameters; returns its record entries."""
        return {}
