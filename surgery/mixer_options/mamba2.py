"""Options of the Mamba-2 mixer (:mod:`surgery.mixers.mamba2`): its ``params`` and ``init`` models, without torch."""

from __future__ import annotations

from pydantic import Field, model_validator

from . import MixerInit, MixerParams, check_divides


class Mamba2Params(MixerParams):
    """Shape of a Mamba-2 mixer (``replace[i].params``); None fields come from the teacher."""

    n_heads: int | None = Field(None, gt=0, description="SSM heads (x, dt, A, D per head); default: the teacher's query heads")
    head_dim: int | None = Field(None, gt=0, description="x head dimension p; default: the teacher's head dim")
    d_state: int | None = Field(None, gt=0, description="state size n; default: the teacher's head dim (needed for q->C, k->B)")
    ngroups: int | None = Field(
        None, gt=0, description="B/C groups (and gated-norm groups); default: the teacher's query heads (needed for q->C)"
    )
    d_conv: int = Field(4, ge=0, description="kernel size of the causal depthwise conv on x, B, C; 0 disables it")
    conv_bias: bool = Field(True, description="learn a bias in the conv")
    bias: bool = Field(False, description="biases on the input projections and out_proj")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of the gated RMSNorm")
    chunk_size: int = Field(128, gt=0, description="SSD chunk length (speed only; results do not depend on it)")

    @model_validator(mode="after")
    def _groups_divide(self) -> Mamba2Params:
        if self.n_heads is not None and self.ngroups is not None:
            check_divides("mamba2", ("ngroups", self.ngroups), ("n_heads", self.n_heads))
        return self


class Mamba2Init(MixerInit):
    """Initialisation of a Mamba-2 mixer (``replace[i].init``); defaults are Mamba-2's."""

    q_to_C: bool = Field(False, description="copy W_Q into C_proj (needs ngroups == teacher heads, d_state == head dim)")
    k_to_B: bool = Field(
        False, description="copy W_K into B_proj (ngroups == teacher KV heads, or query heads with GQA expansion)"
    )
    v_to_x: bool = Field(False, description="copy W_V into x_proj (n_heads == KV heads or query heads; head_dim == teacher's)")
    o_to_out: bool = Field(False, description="copy W_O into out_proj (n_heads == teacher heads, head_dim == teacher's)")
    identity_conv: bool = Field(False, description="initialise the conv to the identity (default: PyTorch's conv init)")
    dt_min: float = Field(1e-3, gt=0, description="smallest initial dt (log-uniform between dt_min and dt_max)")
    dt_max: float = Field(1e-1, gt=0, description="largest initial dt")
    dt_init_floor: float = Field(1e-4, gt=0, description="lower clamp of the initial dt")
    A_init_min: float = Field(1.0, gt=0, description="A = -exp(A_log) starts uniform in [-A_init_max, -A_init_min]")
    A_init_max: float = Field(16.0, gt=0, description="see A_init_min")
    D: float = Field(1.0, description="initial value of the skip D")

    @model_validator(mode="after")
    def _ranges(self) -> Mamba2Init:
        if self.dt_max < self.dt_min:
            raise ValueError(f"mamba2: dt_max ({self.dt_max}) must be >= dt_min ({self.dt_min})")
        if self.A_init_max < self.A_init_min:
            raise ValueError(f"mamba2: A_init_max ({self.A_init_max}) must be >= A_init_min ({self.A_init_min})")
        return self


__all__ = ["Mamba2Init", "Mamba2Params"]
