"""Families refused by design, each with the reason (:data:`~rewrites.adapters.base.REFUSED`).

``surgery plan`` and ``surgery apply`` name the reason before anything is trained or written; the
README's family table lists them with what supporting them would take.
"""

from __future__ import annotations

from .base import REFUSED

_MLA = (
    "multi-head latent attention: low-rank q and kv projections with norms in between, a decoupled RoPE "
    "key, and value heads of another size than query/key heads (v_head_dim != qk_head_dim); the common "
    "attention layout (AttentionShape/AttentionWeights: one head_dim for q, k, v and o) cannot express it. "
    "Supporting it needs per-projection head dims in that contract and a transfer that folds the low-rank "
    "factors"
)

REFUSED.update({
    "bloom": (
        "BloomAttention adds the residual inside itself (forward(hidden_states, residual, alibi, ...) returns "
        "residual + attention), so a mixer in its place would silently drop the residual stream; supporting it "
        "needs an adapter hook that wraps the mixer as 'residual + mixer(x)' and a rebuilt-student check of it"
    ),
    "mpt": (
        "MptAttention reads its mask inverted (a boolean mask where True means masked, from .to(torch.bool) of an "
        "additive mask) and takes ALiBi as a separate position_bias; a mixer in its place would read every token "
        "as padding. Supporting it needs the adapter contract to hand mixers a mask in transformers' convention"
    ),
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
})
