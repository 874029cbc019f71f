"""Low-rank mixer: causal linear attention ``M = tril(phi(C) phi(B)^T)``, optionally row-normalised.

Linear attention (Katharopoulos et al. 2020, arXiv 2006.16236): per head ``h`` and token ``t``::

    C_t = phi(C_proj(u)_t),  B_t = phi(B_proj(u)_t)         rank r, feature map phi (``feature_map``)
    H_t = H_{t-1} + x_t B_t^T,   y_t = H_t C_t               no decay: an SSD with log_a = 0
    normalize:  y_t = (H_t C_t) / (z_t . C_t + eps),  z_t = z_{t-1} + B_t

so ``M[l, s] = phi(C_l) . phi(B_s)`` for ``l >= s`` (divided by the row sum when normalised): the
low-rank member of MOHAWK's matrix-mixer ablation (Bick et al. 2024, arXiv 2408.10189, Tables 3-4).
The scan is :func:`surgery.ops.ssd` without decay (chunked; the fused kernels on CUDA), the
normaliser ``z`` a cumulative sum of ``phi(B)`` kept as one extra row of the state
(``(b, h, p + 1, n)``); decoding is :func:`surgery.ops.ssd_step` with ``z`` riding along as one more
column of ``x``. Without ``normalize`` the matrix has SSD factors, so stage 1 takes the
factored (fused) distance; with it, the materialised matrix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..mixer_options.low_rank import LowRankInit, LowRankParams
from ..ops.ssd_reference import compute_dtype
from ..ops.stage1 import MatrixFactors
from . import register_mixer
from ._common import check_positive, name_modules
from ._gated import GatedHeads, resolve_b_heads
from .base import AttentionShape, MixerParams

FEATURE_MAPS = {
    "identity": lambda t: t,
    "elu1": lambda t: F.elu(t) + 1.0,
    "relu": F.relu,
    "softplus": F.softplus,
}


@register_mixer("low_rank")
class LowRank(GatedHeads):
    """Causal linear attention (see the module docstring)."""

    params_model = LowRankParams
    init_model = LowRankInit

    def __init__(self, d_model: int, params: LowRankParams | dict[str, Any], layer_idx: int) -> None:
        super().__init__(d_model, params, layer_idx)
        p = self.params
        check_positive("low_rank", n_heads=p.n_heads, head_dim=p.head_dim, n_b_heads=p.n_b_heads, rank=p.rank)
        self.n_b, self.r = p.n_b_heads, p.rank
        self.phi = FEATURE_MAPS[p.feature_map]
        self.C_proj = nn.Linear(d_model, self.h * self.r, bias=p.bias)
        self.B_proj = nn.Linear(d_model, self.n_b * self.r, bias=p.bias)
        name_modules(self)

    @classmethod
    def resolve_params(cls, params: MixerParams, shape: AttentionShape) -> LowRankParams:
        """Fill None fields from the teacher's attention shape (see the field descriptions)."""
        raw = cls.resolve_heads(params, shape)
        raw["n_b_heads"] = resolve_b_heads(raw["n_heads"], raw.get("n_b_heads"), shape)
        raw["rank"] = raw.get("rank") or shape.head_dim
        return LowRankParams.model_validate(raw)

    def features(self, u: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """u (b, L, d) -> phi(B) (b, L, n_b, r) (zero on padding), phi(C) (b, L, h, r)."""
        b, L, _ = u.shape
        B = self.phi(self.B_proj(u)).reshape(b, L, self.n_b, self.r)
        if valid is not None:
            B = B * valid[..., None, None]
        return B, self.phi(self.C_proj(u)).reshape(b, L, self.h, self.r)

    def core(
        self, u: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None, state: torch.Tensor | None, keep: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, L, h, p = x.shape
        B, C = self.features(u, valid)
        if state is not None and L == 1:  # decode: the row sums ride along as one more column of x
            if self.params.normalize:
                x = torch.cat([x, x.new_ones(b, L, h, 1)], dim=-1)  # (b, 1, h, p+1)
            y, state = ops.ssd_step(x[:, 0], x.new_zeros(b, h), B[:, 0], C[:, 0], state=state)
            y = y[:, None]  # (b, 1, h, p[+1])
            if self.params.normalize:
                y = y[..., :p] / (y[..., p:] + self.params.eps)  # (b, 1, h, p)
            return y, state
        scan_state = None if state is None else state[:, :, :p]  # (b, h, p, n)
        y, final = ops.ssd(x, None, B, C, chunk_size=self.params.chunk_size, initial_state=scan_state)
        if not self.params.normalize:
            return y, final
        z, z_final = self.row_sums(B, C, None if state is None else state[:, :, p])
        y = (y.to(z.dtype) / (z[..., None] + self.params.eps)).to(y.dtype)  # (b, L, h, p)
        return y, torch.cat([final, z_final[:, :, None].to(final.dtype)], dim=2)  # (b, h, p+1, n)

    def row_sums(
        self, B: torch.Tensor, C: torch.Tensor, z0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normaliser ``phi(C_t) . (z0 + sum_{s<=t} phi(B_s))``: B (b, L, n_b, r), C (b, L, h, r),
        z0 (b, h, r) -> row sums (b, L, h) and the final ``z`` (b, h, r), in the compute dtype.

        A cumulative sum, not a second scan, so the scan above keeps the head dim the fused kernel takes."""
        dtype = compute_dtype(B.dtype)
        z = B.to(dtype).cumsum(1).repeat_interleave(self.h // self.n_b, dim=2)  # (b, L, h, r)
        if z0 is not None:
            z = z + z0.to(dtype)[:, None]
        return (z * C.to(dtype)).sum(-1), z[:, -1]

    def has_matrix_factors(self) -> bool:
        return not self.params.normalize

    def matrix_factors(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> MatrixFactors:
        if self.params.normalize:
            raise NotImplementedError("low_rank with normalize=true has no SSD factors; use materialize")
        B, C = self.features(u, mask)  # (b, L, n_b, r), (b, L, h, r)
        return MatrixFactors(B.new_zeros(*B.shape[:2], self.h), B, C)

    def materialize(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``M (b, h, L, L)``: ``tril(phi(C) phi(B)^T)``, divided by its row sums when normalised."""
        B, C = self.features(u, mask)
        dtype = compute_dtype(u.dtype)
        B = B.to(dtype).repeat_interleave(self.h // self.n_b, dim=2)  # (b, L, h, r)
        L = u.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=u.device).tril()
        M = torch.einsum("blhr,bshr->bhls", C.to(dtype), B).masked_fill(~causal, 0.0)  # (b, h, L, L)
        if self.params.normalize:
            M = M / (M.sum(-1, keepdim=True) + self.params.eps)
        return M

    def matrix_parameters(self) -> list[nn.Parameter]:
        return [*self.C_proj.parameters(), *self.B_proj.parameters()]

    def transfer_targets(self) -> dict[str, tuple[nn.Linear, tuple[str, int], tuple[str, int], str, str]]:
        return {
            "q_to_C": (self.C_proj, ("n_heads", self.h), ("rank", self.r), "q", "q"),
            "k_to_B": (self.B_proj, ("n_b_heads", self.n_b), ("rank", self.r), "kv", "k"),
            **super().transfer_targets(),
        }

    def weight_views(self) -> dict[str, torch.Tensor]:
        d = self.d_model
        return {"C": self.C_proj.weight.view(self.h, self.r, d), "B": self.B_proj.weight.view(self.n_b, self.r, d),
                **super().weight_views()}
