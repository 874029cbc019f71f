"""Discrete Mamba-2: the student mixer of Phi-Mamba / Llamba (MOHAWK, Bick et al. 2024, arXiv 2408.10189).

A multi-head Mamba-2 (Dao & Gu 2024, arXiv 2405.21060) whose decay is fully input-dependent.
Per v-head ``h`` and token ``t``::

    a_t = exp(-softplus(A_log_t))                 A_log = A_log_proj(u), one per v-head
    H_t = a_t H_{t-1} + x_t B_t^T,   y_t = H_t C_t + D_h x_t
    out = out_proj(y * silu(z + z_bias))          no norm before out_proj

with an identity-activation depthwise causal conv (kernel ``d_conv``) on ``x``, ``B``, ``C``.
No learned scalar A, no dt, no dt-scaling of x.

Heads: ``n_v_heads`` x heads (head dim ``head_dim``; decay and D per v-head), ``n_qk_heads``
C heads and ``n_b_heads`` B heads (state size ``d_state``); v-head ``h`` reads C head
``h // (n_v / n_qk)`` and B head ``h // (n_v / n_b)``. A grouped-query teacher maps as B per KV
group, C per query head, x per query head (copied from its KV group).

The parts that build the mixing matrix -- ``B_proj``, ``C_proj``, ``A_log_proj``, their conv
``conv_bc`` and ``D`` -- are separate modules from the rest (``x_proj``, ``conv_x``, ``z_proj``,
``z_bias``, ``out_proj``), so MOHAWK stage 1 trains exactly :meth:`matrix_parameters`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import register_mixer
from ._common import (
    GATE_OPEN_BIAS,
    causal_conv,
    check_positive,
    identity_conv_,
    make_conv,
    project,
    name_modules,
    split_conv_window,
    transfer_qkvo,
)
from ..mixer_options.discrete_mamba2 import DiscreteMamba2Init, DiscreteMamba2Params
from ..ops.stage1 import MatrixFactors
from .base import AttentionShape, AttentionWeights, Mixer, MixerInit, MixerParams


@register_mixer("discrete_mamba2")
class DiscreteMamba2(Mixer):
    """Discrete Mamba-2 (see the module docstring)."""

    params_model = DiscreteMamba2Params
    init_model = DiscreteMamba2Init

    def __init__(self, d_model: int, params: DiscreteMamba2Params | dict[str, Any], layer_idx: int) -> None:
        super().__init__(d_model, params, layer_idx)
        p = self.resolved()
        check_positive("discrete_mamba2", n_v_heads=p.n_v_heads, n_qk_heads=p.n_qk_heads, n_b_heads=p.n_b_heads)
        check_positive("discrete_mamba2", head_dim=p.head_dim, d_state=p.d_state, chunk_size=p.chunk_size)
        self.n_v, self.n_qk, self.n_b = p.n_v_heads, p.n_qk_heads, p.n_b_heads
        self.p, self.n = p.head_dim, p.d_state
        self.d_inner = self.n_v * self.p
        # the rest: x, gate, output
        self.x_proj = nn.Linear(d_model, self.d_inner, bias=p.bias)
        self.conv_x = make_conv(self.d_inner, p.d_conv, p.conv_bias)
        self.z_proj = nn.Linear(d_model, self.d_inner, bias=p.bias)
        self.z_bias = nn.Parameter(torch.zeros(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=p.bias)
        # the mixing matrix: B, C, decay, their conv, D
        self.B_proj = nn.Linear(d_model, self.n_b * self.n, bias=p.bias)
        self.C_proj = nn.Linear(d_model, self.n_qk * self.n, bias=p.bias)
        self.A_log_proj = nn.Linear(d_model, self.n_v, bias=p.bias)
        self.conv_bc = make_conv((self.n_b + self.n_qk) * self.n, p.d_conv, p.conv_bias)
        self.D = nn.Parameter(torch.ones(self.n_v))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        name_modules(self)

    # ------------------------------------------------------------------ construction

    @classmethod
    def resolve_params(cls, params: MixerParams, shape: AttentionShape) -> DiscreteMamba2Params:
        """Fill None fields from the teacher's attention shape (see the field descriptions)."""
        p = params if isinstance(params, DiscreteMamba2Params) else DiscreteMamba2Params.model_validate(params.model_dump())
        n_qk = p.n_qk_heads or shape.n_heads
        if p.n_b_heads is not None:
            n_b = p.n_b_heads
        else:
            n_b = shape.n_kv_heads if n_qk == shape.n_heads and n_qk % shape.n_kv_heads == 0 else n_qk
        return DiscreteMamba2Params.model_validate(
            {
                **p.model_dump(),
                "n_v_heads": p.n_v_heads or shape.n_heads,
                "n_qk_heads": n_qk,
                "n_b_heads": n_b,
                "head_dim": p.head_dim or shape.head_dim,
                "d_state": p.d_state or shape.head_dim,
            }
        )

    # ------------------------------------------------------------------ forward pieces

    def decode_projections(self) -> list[nn.Linear]:
        return [self.x_proj, self.B_proj, self.C_proj, self.A_log_proj, self.z_proj]

    def _matrix_inputs(
        self, u: torch.Tensor, valid: torch.Tensor | None, history: torch.Tensor | None = None,
        projected: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """u (b, L, d) -> log_a (b, L, h), B (b, L, n_b, n), C (b, L, n_qk, n), new B|C conv window.

        ``projected``: ``(B_proj(u), C_proj(u), A_log_proj(u))`` when the caller has them already.
        """
        b, L, _ = u.shape
        B_raw, C_raw, A_log = projected or (self.B_proj(u), self.C_proj(u), self.A_log_proj(u))
        bc = torch.cat([B_raw, C_raw], dim=-1)  # (b, L, (n_b + n_qk) n); A_log (b, L, h)
        if valid is not None:
            bc = bc * valid[..., None]  # padding enters the conv as zeros
        bc, window = causal_conv(bc, self.conv_bc, history)  # identity activation
        B, C = bc.split([self.n_b * self.n, self.n_qk * self.n], dim=-1)
        log_a = -F.softplus(A_log)  # (b, L, h), <= 0
        if valid is not None:
            log_a = log_a * valid[..., None]  # decay 1 on padding
        return log_a, B.reshape(b, L, self.n_b, self.n), C.reshape(b, L, self.n_qk, self.n), window

    def _x_inputs(
        self, u: torch.Tensor, valid: torch.Tensor | None, history: torch.Tensor | None = None,
        projected: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """u (b, L, d) -> post-conv x (b, L, h, p) (zero on padding), new x conv window. ``projected``: x_proj(u)."""
        b, L, _ = u.shape
        x = self.x_proj(u) if projected is None else projected  # (b, L, d_inner)
        if valid is not None:
            x = x * valid[..., None]
        x, window = causal_conv(x, self.conv_x, history)
        if valid is not None:
            x = x * valid[..., None]  # no input from padding (the conv bias would give some)
        return x.reshape(b, L, self.n_v, self.p), window

    def ssm_output(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self._x_inputs(u, mask)
        log_a, B, C, _ = self._matrix_inputs(u, mask)
        y, _ = ops.ssd(x, log_a, B, C, chunk_size=self.params.chunk_size, D=self.D)
        return x, y

    def mix(self, u: torch.Tensor, mask: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        b, L, _ = u.shape
        slot = self.state_slot(cache, L)
        hist_x, hist_bc = split_conv_window(slot.conv_state if slot is not None else None, self.d_inner)
        state = slot.ssm_state if slot is not None else None
        fused = slot.fused_projection if slot is not None and L == 1 else None
        x_raw, B_raw, C_raw, A_log, z = project(u, self.decode_projections(), fused)
        x, win_x = self._x_inputs(u, mask, hist_x, x_raw)  # (b, L, h, p)
        log_a, B, C, win_bc = self._matrix_inputs(u, mask, hist_bc, (B_raw, C_raw, A_log))
        if state is not None and L == 1:  # decoding: one recurrence step
            y, state = ops.ssd_step(x[:, 0], log_a[:, 0], B[:, 0], C[:, 0], D=self.D, state=state)
            y = y[:, None]  # (b, 1, h, p)
        else:
            y, state = ops.ssd(x, log_a, B, C, chunk_size=self.params.chunk_size, D=self.D, initial_state=state)
        if slot is not None:
            window = None if win_x is None else torch.cat([win_x, win_bc], dim=1)
            slot.store(state, window, L)
        y = y.reshape(b, L, self.d_inner)
        return self.out_proj(y * F.silu(z + self.z_bias))

    def matrix_factors(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> MatrixFactors:
        log_a, B, C, _ = self._matrix_inputs(u, mask)  # (b, L, h), (b, L, n_b, n), (b, L, n_qk, n)
        return MatrixFactors(log_a, B, C, D=self.D)

    # ------------------------------------------------------------------ stage 1 and transfer

    @property
    def n_matrix_heads(self) -> int:
        return self.n_v

    def matrix_parameters(self) -> list[nn.Parameter]:
        modules: list[nn.Module | None] = [self.B_proj, self.C_proj, self.A_log_proj, self.conv_bc]
        params = [q for m in modules if m is not None for q in m.parameters()]
        return [*params, self.D]

    def weight_views(self) -> dict[str, torch.Tensor]:
        d = self.d_model
        return {
            "C": self.C_proj.weight.view(self.n_qk, self.n, d),
            "B": self.B_proj.weight.view(self.n_b, self.n, d),
            "x": self.x_proj.weight.view(self.n_v, self.p, d),
            "out": self.out_proj.weight.view(d, self.n_v, self.p),
        }

    @torch.no_grad()
    def init_from_attention(self, weights: AttentionWeights | None, init: MixerInit) -> dict[str, str]:
        init = init if isinstance(init, DiscreteMamba2Init) else DiscreteMamba2Init.model_validate(init.model_dump())
        record: dict[str, str] = {}
        asked = self.requested_transfers(weights, init)
        if weights is not None and asked:
            record.update(transfer_qkvo(
                self.name, self.d_model, weights, init,
                C=(self.C_proj, ("n_qk_heads", self.n_qk), ("d_state", self.n)),
                B=(self.B_proj, ("n_b_heads", self.n_b), ("d_state", self.n)),
                x=(self.x_proj, ("n_v_heads", self.n_v), ("head_dim", self.p)),
                out=(self.out_proj, self.n_v, self.p),
            ))
        if init.identity_conv and self.conv_x is not None:
            identity_conv_(self.conv_x)
            identity_conv_(self.conv_bc)
            record["conv_x, conv_bc"] = "identity"
        if init.open_gate:
            self.z_proj.weight.zero_()
            if self.z_proj.bias is not None:
                self.z_proj.bias.zero_()
            self.z_bias.fill_(GATE_OPEN_BIAS)
            record["z_proj, z_bias"] = f"open gate (0, {GATE_OPEN_BIAS})"
        self.D.fill_(init.D)
        record["D"] = f"{init.D:g}"
        return record
