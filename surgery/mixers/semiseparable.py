"""Semiseparable mixer with a diagonal transition: a decay per state dimension (Mamba-1 / GLA style).

Per head ``h`` and token ``t`` (state ``H (p, n)``)::

    log_a_t = -softplus(A_proj(u)_t)               (n,) per head: a diagonal, input-dependent transition
    H_t = H_{t-1} diag(exp(log_a_t)) + x_t B_t^T,  y_t = H_t C_t

so ``M[l, s] = sum_n C_l[n] B_s[n] exp(sum_{s<k<=l} log_a_k[n])``: a general (rank-``n``) semiseparable
matrix whose generators are diagonal, the richest family of MOHAWK's ablation (Bick et al. 2024,
arXiv 2408.10189, Table 3 "general semi-separable"); gated linear attention's recurrence (Yang et al.
2023, arXiv 2312.06635) with a full-rank decay projection. SSD (discrete Mamba-2) is the special case
of one decay shared by all ``n``. The forward is :func:`surgery.ops.structured.gla_chunked` (plain torch on
every device), decoding :func:`~surgery.ops.structured.gla_step`, the matrix
:func:`~surgery.ops.structured.gla_matrix`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..mixer_options.semiseparable import SemiseparableInit, SemiseparableParams
from ..ops.structured import gla_chunked, gla_matrix, gla_step
from . import register_mixer
from ._common import check_positive, name_modules
from ._gated import GatedHeads, resolve_b_heads
from .base import AttentionShape, MixerParams


@register_mixer("semiseparable")
class Semiseparable(GatedHeads):
    """Diagonal-decay semiseparable mixer (see the module docstring)."""

    params_model = SemiseparableParams
    init_model = SemiseparableInit

    def __init__(self, d_model: int, params: SemiseparableParams | dict[str, Any], layer_idx: int) -> None:
        super().__init__(d_model, params, layer_idx)
        p = self.params
        check_positive("semiseparable", n_heads=p.n_heads, head_dim=p.head_dim, n_b_heads=p.n_b_heads, d_state=p.d_state)
        self.n_b, self.n = p.n_b_heads, p.d_state
        self.C_proj = nn.Linear(d_model, self.h * self.n, bias=p.bias)
        self.B_proj = nn.Linear(d_model, self.n_b * self.n, bias=p.bias)
        self.A_proj = nn.Linear(d_model, self.h * self.n, bias=p.bias)
        name_modules(self)

    @classmethod
    def resolve_params(cls, params: MixerParams, shape: AttentionShape) -> SemiseparableParams:
        """Fill None fields from the teacher's attention shape (see the field descriptions)."""
        raw = cls.resolve_heads(params, shape)
        raw["n_b_heads"] = resolve_b_heads(raw["n_heads"], raw.get("n_b_heads"), shape)
        raw["d_state"] = raw.get("d_state") or shape.head_dim
        return SemiseparableParams.model_validate(raw)

    def matrix_inputs(
        self, u: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (b, L, d) -> log_a (b, L, h, n) (0 on padding), B (b, L, n_b, n) (0 on padding), C (b, L, h, n)."""
        b, L, _ = u.shape
        log_a = -F.softplus(self.A_proj(u)).reshape(b, L, self.h, self.n)
        B = self.B_proj(u).reshape(b, L, self.n_b, self.n)
        if valid is not None:
            log_a = log_a * valid[..., None, None]  # decay 1 on padding
            B = B * valid[..., None, None]
        return log_a, B, self.C_proj(u).reshape(b, L, self.h, self.n)

    def core(
        self, u: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None, state: torch.Tensor | None, keep: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        log_a, B, C = self.matrix_inputs(u, valid)
        if state is not None and x.shape[1] == 1:
            y, state = gla_step(x[:, 0], log_a[:, 0], B[:, 0], C[:, 0], state)
            return y[:, None], state
        return gla_chunked(x, log_a, B, C, chunk_size=self.params.chunk_size, initial_state=state)

    def materialize(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``M (b, h, L, L)`` (columns of padding zero)."""
        log_a, B, C = self.matrix_inputs(u, mask)
        return gla_matrix(log_a, B, C, chunk_size=self.params.chunk_size)

    def matrix_parameters(self) -> list[nn.Parameter]:
        return [*self.C_proj.parameters(), *self.B_proj.parameters(), *self.A_proj.parameters()]

    def transfer_targets(self) -> dict[str, tuple[nn.Linear, tuple[str, int], tuple[str, int], str, str]]:
        return {
            "q_to_C": (self.C_proj, ("n_heads", self.h), ("d_state", self.n), "q", "q"),
            "k_to_B": (self.B_proj, ("n_b_heads", self.n_b), ("d_state", self.n), "kv", "k"),
            **super().transfer_targets(),
        }

    def weight_views(self) -> dict[str, torch.Tensor]:
        d = self.d_model
        return {"C": self.C_proj.weight.view(self.h, self.n, d), "B": self.B_proj.weight.view(self.n_b, self.n, d),
                **super().weight_views()}
