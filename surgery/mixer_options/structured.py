"""Options shared by the structured mixers (``toeplitz``, ``low_rank``, ``semiseparable``), without torch.

The three mixers share one block around their mixing matrix (:mod:`surgery.mixers._gated`): ``x = x_proj(u)``
per head, ``y = M x``, ``out = out_proj(y * silu(z_proj(u) + z_bias))``. No short conv, so that the families
differ only in the structure of ``M`` (MOHAWK, Bick et al. 2024, arXiv 2408.10189, Tables 3-4).
"""

from __future__ import annotations

from pydantic import Field

from . import MixerInit, MixerParams


class GatedHeadsParams(MixerParams):
    """Head geometry of the shared block; None fields come from the teacher."""

    n_heads: int | None = Field(None, gt=0, description="mixer heads (x, matrix, gate per head); default: the teacher's query heads")
    head_dim: int | None = Field(None, gt=0, description="x head dimension p; default: the teacher's head dim")
    bias: bool = Field(False, description="biases on the input projections and out_proj")


class GatedHeadsInit(MixerInit):
    """Initialisation of the shared block (``replace[i].init``)."""

    v_to_x: bool = Field(False, description="copy W_V into x_proj (n_heads == KV heads or query heads; head_dim == teacher's)")
    o_to_out: bool = Field(False, description="copy W_O into out_proj (n_heads == teacher heads, head_dim == teacher's)")
    open_gate: bool = Field(True, description="z_proj = 0 and z_bias = 1.2785 so silu(z + z_bias) ~= 1 at init")


__all__ = ["GatedHeadsInit", "GatedHeadsParams"]
