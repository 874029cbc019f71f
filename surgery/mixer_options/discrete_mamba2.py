"""Options of the discrete Mamba-2 mixer (:mod:`surgery.mixers.discrete_mamba2`): its ``params`` and ``init`` models, without torch."""

from __future__ import annotations

from pydantic import Field, model_validator

from . import MixerInit, MixerParams, check_divides


class DiscreteMamba2Params(MixerParams):
    """Shape of a discrete Mamba-2 mixer (``replace[i].params``); None fields come from the teacher."""

    n_v_heads: int | None = Field(
        None, gt=0, description="x heads (decay, D and output per head); default: the teacher's query heads"
    )
    n_qk_heads: int | None = Field(None, gt=0, description="C heads (query-like); default: the teacher's query heads")
    n_b_heads: int | None = Field(
        None,
        gt=0,
        description="B heads (key-like); default: the teacher's key/value heads when n_qk_heads is the teacher's "
        "query head count (B per KV group), else n_qk_heads",
    )
    head_dim: int | None = Field(None, gt=0, description="x head dimension p; default: the teacher's head dim")
    d_state: int | None = Field(None, gt=0, description="state size n per head; default: the teacher's head dim")
    d_conv: int = Field(4, ge=0, description="kernel size of the causal depthwise conv on x, B, C; 0 disables it")
    conv_bias: bool = Field(True, description="learn a bias in the conv")
    bias: bool = Field(False, description="biases on the input projections and out_proj")
    chunk_size: int = Field(128, gt=0, description="SSD chunk length (speed only; results do not depend on it)")

    @model_validator(mode="after")
    def _heads_nest(self) -> DiscreteMamba2Params:
        if self.n_v_heads is not None and self.n_qk_heads is not None:
            check_divides("discrete_mamba2", ("n_qk_heads", self.n_qk_heads), ("n_v_heads", self.n_v_heads))
        if self.n_qk_heads is not None and self.n_b_heads is not None:
            check_divides("discrete_mamba2", ("n_b_heads", self.n_b_heads), ("n_qk_heads", self.n_qk_heads))
        return self


class DiscreteMamba2Init(MixerInit):
    """Initialisation of a discrete Mamba-2 mixer (``replace[i].init``)."""

    q_to_C: bool = Field(False, description="copy W_Q into C_proj (needs n_qk_heads == teacher heads, d_state == head dim)")
    k_to_B: bool = Field(
        False, description="copy W_K into B_proj (n_b_heads == teacher KV heads, or query heads with GQA expansion)"
    )
    v_to_x: bool = Field(False, description="copy W_V into x_proj (n_v_heads == KV heads or query heads; head_dim == teacher's)")
    o_to_out: bool = Field(False, description="copy W_O into out_proj (n_v_heads == teacher heads, head_dim == teacher's)")
    identity_conv: bool = Field(True, description="initialise the conv to the identity (MOHAWK blog)")
    open_gate: bool = Field(True, description="z_proj = 0 and z_bias = 1.2785 so silu(z + z_bias) ~= 1 at init")
    D: float = Field(1.0, description="initial value of the skip D")


__all__ = ["DiscreteMamba2Init", "DiscreteMamba2Params"]
