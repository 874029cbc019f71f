"""Options of the diagonal-decay semiseparable mixer (:mod:`surgery.mixers.semiseparable`), without torch."""

from __future__ import annotations

from pydantic import Field, model_validator

from . import check_divides
from .structured import GatedHeadsInit, GatedHeadsParams


class SemiseparableParams(GatedHeadsParams):
    """Shape of a semiseparable mixer with a decay per state dimension (GLA / Mamba-1 style)."""

    n_b_heads: int | None = Field(
        None, gt=0, description="B (key-like) heads; default: the teacher's key/value heads when n_heads is the teacher's "
        "query head count, else n_heads",
    )
    d_state: int | None = Field(None, gt=0, description="state size n per head (one decay each); default: the teacher's head dim")
    chunk_size: int = Field(
        16, gt=0, description="chunk length of the scan (speed and memory only; 16 was fastest on a CPU at d_state 32)"
    )

    @model_validator(mode="after")
    def _heads_nest(self) -> SemiseparableParams:
        if self.n_heads is not None and self.n_b_heads is not None:
            check_divides("semiseparable", ("n_b_heads", self.n_b_heads), ("n_heads", self.n_heads))
        return self


class SemiseparableInit(GatedHeadsInit):
    """Initialisation of a semiseparable mixer (``replace[i].init``)."""

    q_to_C: bool = Field(False, description="copy W_Q into C_proj (d_state == teacher head dim)")
    k_to_B: bool = Field(False, description="copy W_K into B_proj (n_b_heads == KV heads or query heads; d_state == head dim)")


__all__ = ["SemiseparableInit", "SemiseparableParams"]
