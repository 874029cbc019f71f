"""Options of the low-rank (causal linear attention) mixer (:mod:`surgery.mixers.low_rank`), without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from . import check_divides
from .structured import GatedHeadsInit, GatedHeadsParams

FeatureMap = Literal["identity", "elu1", "relu", "softplus"]
POSITIVE_MAPS = ("elu1", "relu", "softplus")


class LowRankParams(GatedHeadsParams):
    """Shape of a causal linear-attention mixer ``M = tril(phi(C) phi(B)^T)`` (``replace[i].params``)."""

    n_b_heads: int | None = Field(
        None, gt=0, description="B (key-like) heads; default: the teacher's key/value heads when n_heads is the teacher's "
        "query head count, else n_heads",
    )
    rank: int | None = Field(None, gt=0, description="feature dimension r of phi(C), phi(B); default: the teacher's head dim")
    feature_map: FeatureMap = Field(
        "elu1", description="phi: identity (the paper's tril(QK^T)), elu1 (elu(x)+1, Katharopoulos et al. 2020), relu, softplus"
    )
    normalize: bool = Field(
        True, description="divide each row by its sum (linear attention's normaliser; needs a positive feature map)"
    )
    eps: float = Field(1e-6, gt=0, description="added to the row sums when normalize is on")
    chunk_size: int = Field(128, gt=0, description="chunk length of the SSD-form scan (speed only)")

    @model_validator(mode="after")
    def _checks(self) -> LowRankParams:
        if self.normalize and self.feature_map not in POSITIVE_MAPS:
            raise ValueError(
                f"low_rank: normalize=true needs a positive feature_map ({', '.join(POSITIVE_MAPS)}), got {self.feature_map!r}"
            )
        if self.n_heads is not None and self.n_b_heads is not None:
            check_divides("low_rank", ("n_b_heads", self.n_b_heads), ("n_heads", self.n_heads))
        return self


class LowRankInit(GatedHeadsInit):
    """Initialisation of a low-rank mixer (``replace[i].init``)."""

    q_to_C: bool = Field(False, description="copy W_Q into C_proj (rank == teacher head dim)")
    k_to_B: bool = Field(False, description="copy W_K into B_proj (n_b_heads == KV heads or query heads; rank == head dim)")


__all__ = ["FeatureMap", "LowRankInit", "LowRankParams", "POSITIVE_MAPS"]
