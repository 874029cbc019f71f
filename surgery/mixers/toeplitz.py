"""Toeplitz mixer: a causal global convolution, one learned input-independent kernel per head.

``M[l, s] = k_h[l - s]`` for ``0 <= l - s < K`` (kernel size ``K``), the Toeplitz member of MOHAWK's
matrix-mixer ablation (Bick et al. 2024, arXiv 2408.10189, Tables 3-4; as in long-convolution models
such as Hyena / H3's global convolutions). The forward is an FFT convolution; decoding keeps the last
``K - 1`` inputs ``x`` as the state ``(b, h, p, K - 1)`` (fixed size, zeros before the first token) and
takes one dot product per step. The only matrix parameter is ``kernel (h, K)``. The block around it
(``x_proj``, gate, ``out_proj``) is :mod:`surgery.mixers._gated`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..mixer_options.toeplitz import ToeplitzInit, ToeplitzParams
from ..ops.ssd_reference import compute_dtype
from ..ops.structured import toeplitz_conv, toeplitz_matrix, toeplitz_step
from . import register_mixer
from ._common import check_positive
from ._gated import GatedHeads
from .base import AttentionShape, MixerInit, MixerParams


@register_mixer("toeplitz")
class Toeplitz(GatedHeads):
    """Causal global convolution per head (see the module docstring)."""

    params_model = ToeplitzParams
    init_model = ToeplitzInit

    def __init__(self, d_model: int, params: ToeplitzParams | dict[str, Any], layer_idx: int) -> None:
        super().__init__(d_model, params, layer_idx)
        p = self.params
        check_positive("toeplitz", n_heads=p.n_heads, head_dim=p.head_dim, kernel_size=p.kernel_size)
        self.K = p.kernel_size
        self.kernel = nn.Parameter(torch.zeros(self.h, self.K))  # (h, K): k[h, j] weighs the token j steps back
        self.init_matrix(ToeplitzInit())

    @classmethod
    def resolve_params(cls, params: MixerParams, shape: AttentionShape) -> ToeplitzParams:
        """Fill n_heads / head_dim from the teacher's attention shape."""
        return ToeplitzParams.model_validate(cls.resolve_heads(params, shape))

    @torch.no_grad()
    def init_matrix(self, init: MixerInit) -> dict[str, str]:
        length = getattr(init, "init_length", ToeplitzInit().init_length)
        j = torch.arange(self.K, dtype=torch.float64)
        k = torch.exp(-j / length)
        self.kernel.copy_((k / k.sum()).to(self.kernel.dtype).expand(self.h, -1))
        return {"kernel": f"exp(-j/{length:g}), sum 1"}

    def core(
        self, u: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None, state: torch.Tensor | None, keep: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, L, h, p = x.shape
        if state is not None and L == 1:  # decoding: one dot product with the window
            y, window = toeplitz_step(x[:, 0], self.kernel, state)  # (b, h, p), (b, h, p, K-1)
            return y[:, None], window
        y = toeplitz_conv(x, self.kernel, state)  # (b, L, h, p)
        if not keep:
            return y, None
        past = state if state is not None else x.new_zeros(b, h, p, self.K - 1)
        full = torch.cat([past.to(x.dtype), x.permute(0, 2, 3, 1)], dim=-1)  # (b, h, p, K-1+L)
        return y, full[..., full.shape[-1] - (self.K - 1) :]

    def materialize(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``M (b, h, L, L)``, the same for every sequence (columns of padding zero)."""
        b, L, _ = u.shape
        M = toeplitz_matrix(self.kernel.to(compute_dtype(u.dtype)), L)[None].expand(b, -1, -1, -1)  # (b, h, L, L)
        if mask is not None:
            M = M * mask[:, None, None, :].to(M.dtype)
        return M

    def matrix_parameters(self) -> list[nn.Parameter]:
        return [self.kernel]
