"""A test-only mixer implementing the :class:`~surgery.mixers.base.Mixer` contract.

Causal linear attention without normalisation, per head ``h``:
``y_t = sum_{s <= t} (C_t . B_s) x_s``, then ``out_proj``. Its C/B/x/out
projections have the shapes of W_Q/W_K/W_V/W_O with query-head count, so
weight transfer (Q->C, K->B, V->x, O->out, K/V expanded per GQA group) is exact
and checkable through :meth:`weight_views`.

Importing this module registers nothing: :func:`registered` (or the
``placeholder`` fixture pattern in the test modules) adds the mixer and its rule
as ``placeholder_linear`` for one test and removes them afterwards, so other
test modules that parametrise over ``MIXERS`` never see it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from rewrites.registry import RULES
from rewrites.rules import register_mixer_rules
from surgery.mixers import MIXERS
from surgery.mixers.base import AttentionShape, AttentionWeights, Mixer, MixerInit, MixerParams

NAME = "placeholder_linear"


class PlaceholderParams(MixerParams):
    n_heads: int | None = Field(default=None, description="Heads; default: the teacher's query heads.")
    head_dim: int | None = Field(default=None, description="Value dim per head; default: the teacher's.")
    d_state: int | None = Field(default=None, description="B/C dim per head; default: the teacher's head dim.")


class PlaceholderInit(MixerInit):
    transfer: list[Literal["q", "k", "v", "o"]] = Field(
        default_factory=lambda: ["q", "k", "v", "o"], description="Teacher weights to copy: q->C, k->B, v->x, o->out."
    )


class PlaceholderLinear(Mixer):
    """Unnormalised causal linear attention (test double for real SSM mixers)."""

    params_model = PlaceholderParams
    init_model = PlaceholderInit

    def __init__(self, d_model: int, params: PlaceholderParams, layer_idx: int) -> None:
        super().__init__(d_model, params, layer_idx)
        h, p, n = params.n_heads, params.head_dim, params.d_state
        if not (h and p and n):
            raise ValueError(f"{NAME}: n_heads/head_dim/d_state is not set; resolve the params first")
        self.C_proj = nn.Linear(d_model, h * n, bias=False)
        self.B_proj = nn.Linear(d_model, h * n, bias=False)
        self.x_proj = nn.Linear(d_model, h * p, bias=False)
        self.out_proj = nn.Linear(h * p, d_model, bias=False)

    @classmethod
    def resolve_params(cls, params: PlaceholderParams, shape: AttentionShape) -> PlaceholderParams:
        return params.model_copy(
            update={
                "n_heads": params.n_heads or shape.n_heads,
                "head_dim": params.head_dim or shape.head_dim,
                "d_state": params.d_state or shape.head_dim,
            }
        )

    # ------------------------------------------------------------------ contract

    def mix_with_contract(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any) -> torch.Tensor:
        return self.mix(hidden_states)

    def _heads(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, L, _ = u.shape
        h, p, n = self.params.n_heads, self.params.head_dim, self.params.d_state
        C = self.C_proj(u).view(b, L, h, n).transpose(1, 2)  # (b, h, L, n)
        B = self.B_proj(u).view(b, L, h, n).transpose(1, 2)  # (b, h, L, n)
        x = self.x_proj(u).view(b, L, h, p).transpose(1, 2)  # (b, h, L, p)
        return C, B, x

    def materialize(self, u: torch.Tensor) -> torch.Tensor:
        C, B, _ = self._heads(u)
        return torch.tril(C @ B.transpose(-1, -2))  # (b, h, L, L)

    def mix(self, u: torch.Tensor, mask: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        b, L, _ = u.shape
        _, _, x = self._heads(u)
        y = self.materialize(u) @ x  # (b, h, L, p)
        return self.out_proj(y.transpose(1, 2).reshape(b, L, -1))  # (b, L, d)

    @property
    def n_matrix_heads(self) -> int:
        return int(self.params.n_heads)

    def matrix_parameters(self) -> list[nn.Parameter]:
        return [self.C_proj.weight, self.B_proj.weight]

    def weight_views(self) -> dict[str, torch.Tensor]:
        h, p, n, d = self.params.n_heads, self.params.head_dim, self.params.d_state, self.d_model
        return {
            "C": self.C_proj.weight.view(h, n, d),
            "B": self.B_proj.weight.view(h, n, d),
            "x": self.x_proj.weight.view(h, p, d),
            "out": self.out_proj.weight.view(d, h, p),
        }

    def init_from_attention(self, weights: AttentionWeights | None, init: PlaceholderInit) -> dict[str, str]:
        if weights is None:
            return {}
        s = weights.shape
        views = self.weight_views()
        heads = torch.arange(views["C"].shape[0]) % s.n_heads  # mixer head -> teacher query head
        kv = torch.tensor([s.kv_head_of(int(h)) for h in heads])  # -> teacher key/value head
        record: dict[str, str] = {}
        with torch.no_grad():
            for key, src, index in (("C", "q", heads), ("B", "k", kv), ("x", "v", kv)):
                if src in init.transfer:
                    t = getattr(weights, src)[index]  # (h, p, d), GQA-expanded for k/v
                    m = min(t.shape[1], views[key].shape[1])
                    views[key][:, :m].copy_(t[:, :m])
                    record[f"{key}_proj.weight"] = src + (f" (expanded x{s.group_size} per group)" if src in "kv" and s.group_size > 1 else "")
            if "o" in init.transfer and views["out"].shape == weights.o.shape:
                views["out"].copy_(weights.o)
                record["out_proj.weight"] = "o"
        return record


@contextmanager
def registered() -> Iterator[str]:
    """Register the placeholder mixer and its rule while the block runs; yields its name."""
    added = NAME not in MIXERS
    if added:
        PlaceholderLinear.name = NAME
        MIXERS[NAME] = PlaceholderLinear
    register_mixer_rules()
    try:
        yield NAME
    finally:
        if added:
            MIXERS.pop(NAME, None)
            RULES.pop(NAME, None)
