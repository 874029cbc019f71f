"""Standard Mamba-2 (Dao & Gu 2024, arXiv 2405.21060), with Mamba-in-the-Llama weight transfer (arXiv 2408.15237).

Per head ``h`` and token ``t``::

    x, B, C = silu(causal_conv([x_proj(u) | B_proj(u) | C_proj(u)]))
    dt_t = softplus(dt_proj(u)_t + dt_bias),      A_h = -exp(A_log_h)
    H_t = exp(dt_t A_h) H_{t-1} + dt_t x_t B_t^T,  y_t = H_t C_t + D_h x_t
    out = out_proj(rmsnorm(y * silu(z)) * norm_weight)   gated RMSNorm, one per B/C group

``B`` and ``C`` are shared by the heads of each of ``ngroups`` groups. The mixing-matrix parts
(``B_proj``, ``C_proj``, ``conv_bc``, ``dt_proj``, ``dt_bias``, ``A_log``, ``D``) are separate
modules from the rest (``x_proj``, ``conv_x``, ``z_proj``, ``norm_weight``, ``out_proj``), so
stage 1 trains exactly :meth:`matrix_parameters`. Mamba-in-the-Llama initialisation: C <- W_Q,
B <- W_K (expanded per KV group), x <- W_V (expanded), out_proj <- W_O.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import register_mixer
from ._common import (
    causal_conv,
    check_positive,
    identity_conv_,
    inverse_softplus,
    log_uniform_,
    make_conv,
    name_modules,
    project,
    split_conv_window,
    transfer_qkvo,
)
from ..mixer_options.mamba2 import Mamba2Init, Mamba2Params
from ..ops.stage1 import MatrixFactors
from .base import AttentionShape, AttentionWeights, Mixer, MixerInit, MixerParams


@register_mixer("mamba2")
class Mamba2(Mixer):
    """Standard Mamba-2 (see the module docstring)."""

    params_model = Mamba2Params
    init_model = Mamba2Init

    def __init__(self, d_model: int, params: Mamba2Params | dict[str, Any], layer_idx: int) -> None:
        super().__init__(d_model, params, layer_idx)
        p = self.resolved()
        check_positive("mamba2", n_heads=p.n_heads, head_dim=p.head_dim, d_state=p.d_state, ngroups=p.ngroups)
        self.h, self.p, self.n, self.g = p.n_heads, p.head_dim, p.d_state, p.ngroups
        self.d_inner = self.h * self.p
        # the rest: x, gate, norm, output
        self.x_proj = nn.Linear(d_model, self.d_inner, bias=p.bias)
        self.conv_x = make_conv(self.d_inner, p.d_conv, p.conv_bias)
        self.z_proj = nn.Linear(d_model, self.d_inner, bias=p.bias)
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=p.bias)
        # the mixing matrix: B, C, dt, A, their conv, D
        self.B_proj = nn.Linear(d_model, self.g * self.n, bias=p.bias)
        self.C_proj = nn.Linear(d_model, self.g * self.n, bias=p.bias)
        self.conv_bc = make_conv(2 * self.g * self.n, p.d_conv, p.conv_bias)
        self.dt_proj = nn.Linear(d_model, self.h, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(self.h))
        self.A_log = nn.Parameter(torch.zeros(self.h))
        self.D = nn.Parameter(torch.ones(self.h))
        for no_decay in (self.dt_bias, self.A_log, self.D):
            no_decay._no_weight_decay = True  # type: ignore[attr-defined]
        name_modules(self)
        self._init_ssm(Mamba2Init())

    # ------------------------------------------------------------------ construction

    @classmethod
    def resolve_params(cls, params: MixerParams, shape: AttentionShape) -> Mamba2Params:
        """Fill None fields from the teacher's attention shape (see the field descriptions)."""
        p = params if isinstance(params, Mamba2Params) else Mamba2Params.model_validate(params.model_dump())
        return Mamba2Params.model_validate(
            {
                **p.model_dump(),
                "n_heads": p.n_heads or shape.n_heads,
                "head_dim": p.head_dim or shape.head_dim,
                "d_state": p.d_state or shape.head_dim,
                "ngroups": p.ngroups or shape.n_heads,
            }
        )

    @torch.no_grad()
    def _init_ssm(self, init: Mamba2Init) -> None:
        """Mamba-2's dt / A / D init: dt log-uniform in [dt_min, dt_max], A uniform in [A_init_min, A_init_max]."""
        dt = log_uniform_(torch.empty(self.h), init.dt_min, init.dt_max).clamp_(min=init.dt_init_floor)
        self.dt_bias.copy_(inverse_softplus(dt))
        self.A_log.copy_(torch.empty(self.h).uniform_(init.A_init_min, init.A_init_max).log_())
        self.D.fill_(init.D)

    # ------------------------------------------------------------------ forward pieces

    def decode_projections(self) -> list[nn.Linear]:
        return [self.x_proj, self.B_proj, self.C_proj, self.dt_proj, self.z_proj]

    def _matrix_inputs(
        self, u: torch.Tensor, valid: torch.Tensor | None, history: torch.Tensor | None = None,
        projected: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """u (b, L, d) -> dt (b, L, h), A (h,), B (b, L, g, n), C (b, L, g, n), new B|C conv window.

        ``projected``: ``(B_proj(u), C_proj(u), dt_proj(u))`` when the caller has them already.
        """
        b, L, _ = u.shape
        B_raw, C_raw, dt_raw = projected or (self.B_proj(u), self.C_proj(u), self.dt_proj(u))
        bc = torch.cat([B_raw, C_raw], dim=-1)  # (b, L, 2 g n)
        if valid is not None:
            bc = bc * valid[..., None]
        bc, window = causal_conv(bc, self.conv_bc, history)
        B, C = F.silu(bc).split([self.g * self.n, self.g * self.n], dim=-1)
        dt = F.softplus(dt_raw + self.dt_bias)  # (b, L, h)
        if valid is not None:
            dt = dt * valid[..., None]  # padding: decay 1, no input
        A = -torch.exp(self.A_log.float())  # (h,)
        return dt, A, B.reshape(b, L, self.g, self.n), C.reshape(b, L, self.g, self.n), window

    def _x_inputs(
        self, u: torch.Tensor, valid: torch.Tensor | None, history: torch.Tensor | None = None,
        projected: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """u (b, L, d) -> post-conv x (b, L, h, p), new x conv window. ``projected``: x_proj(u)."""
        b, L, _ = u.shape
        x = self.x_proj(u) if projected is None else projected  # (b, L, d_inner)
        if valid is not None:
            x = x * valid[..., None]
        x, window = causal_conv(x, self.conv_x, history)
        return F.silu(x).reshape(b, L, self.h, self.p), window

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``rmsnorm(y * silu(z)) * norm_weight``, normalised per B/C group. y, z (b, L, d_inner)."""
        b, L, _ = y.shape
        v = (y * F.silu(z)).reshape(b, L, self.g, -1)  # (b, L, g, d_inner / g)
        dtype = ops.compute_dtype(v.dtype)
        vf = v.to(dtype)
        vf = vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + self.params.norm_eps)
        return vf.reshape(b, L, -1).to(y.dtype) * self.norm_weight

    def ssm_output(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self._x_inputs(u, mask)
        dt, A, B, C, _ = self._matrix_inputs(u, mask)
        y, _ = ops.ssd_dt(x, dt, A, B, C, chunk_size=self.params.chunk_size, D=self.D)
        return x, y

    def mix(self, u: torch.Tensor, mask: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        b, L, _ = u.shape
        slot = self.state_slot(cache, L)
        hist_x, hist_bc = split_conv_window(slot.conv_state if slot is not None else None, self.d_inner)
        state = slot.ssm_state if slot is not None else None
        fused = slot.fused_projection if slot is not None and L == 1 else None
        x_raw, B_raw, C_raw, dt_raw, z = project(u, self.decode_projections(), fused)
        x, win_x = self._x_inputs(u, mask, hist_x, x_raw)  # (b, L, h, p)
        dt, A, B, C, win_bc = self._matrix_inputs(u, mask, hist_bc, (B_raw, C_raw, dt_raw))
        if state is not None and L == 1:  # decoding: one recurrence step
            log_a, x_in = ops.dt_to_decay(x[:, 0], dt[:, 0], A)  # (b, h), (b, h, p)
            y, state = ops.ssd_step(x_in, log_a, B[:, 0], C[:, 0], state=state)
            y = (y + ops.skip_term(self.D, x[:, 0].to(y.dtype))).to(x.dtype)[:, None]  # (b, 1, h, p)
        else:
            y, state = ops.ssd_dt(x, dt, A, B, C, chunk_size=self.params.chunk_size, D=self.D, initial_state=state)
        if slot is not None:
            window = None if win_x is None else torch.cat([win_x, win_bc], dim=1)
            slot.store(state, window, L)
        y = self._gated_norm(y.reshape(b, L, self.d_inner), z)
        return self.out_proj(y)

    def matrix_factors(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> MatrixFactors:
        dt, A, B, C, _ = self._matrix_inputs(u, mask)  # dt (b, L, h), A (h,)
        log_a = dt.to(ops.compute_dtype(dt.dtype)) * A.to(ops.compute_dtype(dt.dtype))  # (b, L, h)
        return MatrixFactors(log_a, B, C, D=self.D, w=dt)

    # ------------------------------------------------------------------ stage 1 and transfer

    @property
    def n_matrix_heads(self) -> int:
        return self.h

    def matrix_parameters(self) -> list[nn.Parameter]:
        modules: list[nn.Module | None] = [self.B_proj, self.C_proj, self.conv_bc, self.dt_proj]
        params = [q for m in modules if m is not None for q in m.parameters()]
        return [*params, self.dt_bias, self.A_log, self.D]

    def weight_views(self) -> dict[str, torch.Tensor]:
        d = self.d_model
        return {
            "C": self.C_proj.weight.view(self.g, self.n, d),
            "B": self.B_proj.weight.view(self.g, self.n, d),
            "x": self.x_proj.weight.view(self.h, self.p, d),
            "out": self.out_proj.weight.view(d, self.h, self.p),
        }

    @torch.no_grad()
    def init_from_attention(self, weights: AttentionWeights | None, init: MixerInit) -> dict[str, str]:
        init = init if isinstance(init, Mamba2Init) else Mamba2Init.model_validate(init.model_dump())
        record: dict[str, str] = {}
        asked = self.requested_transfers(weights, init)
        if weights is not None and asked:
            record.update(transfer_qkvo(
                self.name, self.d_model, weights, init,
                C=(self.C_proj, ("ngroups", self.g), ("d_state", self.n)),
                B=(self.B_proj, ("ngroups", self.g), ("d_state", self.n)),
                x=(self.x_proj, ("n_heads", self.h), ("head_dim", self.p)),
                out=(self.out_proj, self.h, self.p),
            ))
        if init.identity_conv:
            identity_conv_(self.conv_x)
            identity_conv_(self.conv_bc)
            if self.conv_x is not None:
                record["conv_x, conv_bc"] = "identity"
        self._init_ssm(init)
        record["dt_bias, A_log, D"] = (
            f"dt~logU[{init.dt_min:g},{init.dt_max:g}], A~U[{init.A_init_min:g},{init.A_init_max:g}], D={init.D:g}"
        )
        return record
