"""MOHAWK stage 1's distance from factors: the teacher's ``q``/``k``, the student's SSD factors.

``matrix_squared_distance(q, k, scale, factors)`` is ``||M - P||_F^2`` per (batch, head), with
``P = softmax(scale q k^T)`` (causal) the teacher attention and ``M`` the student's mixing
matrix built from :class:`MatrixFactors` (Bick et al. 2024, arXiv 2408.10189, sec. 4.1). On
CUDA it runs :mod:`surgery.ops.stage1_fused` (Triton; nothing ``L x L`` is materialised); the
plain-torch reference here materialises both matrices and is what the kernel is tested against.
CPU tensors always take the reference and never import triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from .ssd_reference import compute_dtype, ssd_matrix

__all__ = ["MatrixFactors", "attention_probs", "matrix_squared_distance"]


@dataclass
class MatrixFactors:
    """What builds an SSD mixing matrix ``M[l, s] = (C_l . B_s) exp(sum_{s<k<=l} log_a_k) w_s (+ D_h [l == s])``.

    log_a (b, L, h), B (b, L, gB, n), C (b, L, gC, n), D (h,) or None, w (b, L, h) or None (1).
    """

    log_a: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None = None
    w: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        """``M (b, h, L, L)`` in the compute dtype."""
        return ssd_matrix(self.log_a, self.B, self.C, D=self.D, input_scale=self.w)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal ``softmax(scale q k^T)``: q (b, h, L, d), k (b, hk, L, d) -> (b, h, L, L) in the compute dtype."""
    h, hk, L = q.shape[1], k.shape[1], q.shape[2]
    dtype = compute_dtype(q.dtype)
    k = k.repeat_interleave(h // hk, dim=1) if hk != h else k  # (b, h, L, d): query head i reads kv head i // (h/hk)
    z = torch.einsum("bhld,bhsd->bhls", q.to(dtype), k.to(dtype)) * scale  # (b, h, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(z.masked_fill(~causal, float("-inf")), dim=-1)


def matrix_squared_distance(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    factors: MatrixFactors,
    backend: Literal["auto", "reference", "fused"] | None = None,
) -> torch.Tensor:
    """``||M - P||_F^2`` per (batch, head): ``(b, h)``, differentiable in the factors (not in q, k).

    ``backend``: "auto" (the fused kernels on CUDA, the reference elsewhere), "reference" or "fused";
    None: ``SURGERY_STAGE1_BACKEND`` from the environment, else "auto".
    """
    if backend is None:
        backend = os.environ.get("SURGERY_STAGE1_BACKEND", "auto")  # type: ignore[assignment]
    if backend not in ("auto", "reference", "fused"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'fused', got {backend!r}")
    h = q.shape[1]
    if factors.log_a.shape[-1] != h:
        raise ValueError(f"the student matrix has {factors.log_a.shape[-1]} heads, the teacher attention {h}")
    fused = backend == "fused" or (backend == "auto" and q.is_cuda)
    if fused:
        if not q.is_cuda:
            raise RuntimeError("backend='fused' needs CUDA tensors")
        from .stage1_fused import squared_distance_fused

        f = factors
        return squared_distance_fused(q, k, scale, f.log_a, f.B, f.C, D=f.D, w=f.w)
    P = attention_probs(q.detach(), k.detach(), scale)
    M = factors.materialize()
    return (M - P.to(M.dtype)).pow(2).sum((-1, -2))
