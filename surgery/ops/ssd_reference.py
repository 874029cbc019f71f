"""Plain-PyTorch state-space duality (SSD) kernels: the reference every fast path is tested against.

All functions use the *decay form* of the scalar-identity SSM of Mamba-2 (Dao & Gu 2024,
arXiv 2405.21060, section 6), per head ``h`` and token ``t``::

    H_t = exp(log_a_t) * H_{t-1} + x_t B_t^T        H: (p, n) state
    y_t = H_t C_t (+ D x_t)

which is the matrix form ``y = M x`` with the 1-semiseparable mixing matrix
``M[l, s] = (C_l . B_s) * exp(sum_{k=s+1..l} log_a_k)`` for ``l >= s`` (0 above the diagonal).
Standard Mamba-2 maps onto it with ``log_a = dt * A`` and input ``dt * x``
(:func:`surgery.ops.ssd_dt` does that).

Dimension names follow the paper: ``b`` batch, ``L`` length, ``h`` heads, ``p`` head dim,
``n`` state size, ``g`` groups of heads sharing ``B`` / ``C``. ``B`` and ``C`` may have different
group counts (``gB``, ``gC``); each must divide ``h`` and head ``i`` reads group ``i // (h // g)``.

Everything runs on any device and dtype; half-precision inputs are computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "compute_dtype",
    "expand_groups",
    "segsum",
    "skip_term",
    "ssd_chunked",
    "ssd_matrix",
    "ssd_naive",
    "ssd_step",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_groups(t: torch.Tensor, n_heads: int, name: str = "B") -> torch.Tensor:
    """``(..., g, n) -> (..., h, n)``: repeat each group for the heads that read it."""
    g = t.shape[-2]
    if n_heads % g:
        raise ValueError(f"{name} has {g} groups, which does not divide {n_heads} heads")
    return t if g == n_heads else t.repeat_interleave(n_heads // g, dim=-2)


def _common_groups(B: torch.Tensor, C: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand ``B (b, L, gB, n)`` and ``C (b, L, gC, n)`` to one group count ``lcm(gB, gC)``."""
    g = math.lcm(B.shape[-2], C.shape[-2])
    if n_heads % g:
        raise ValueError(f"B groups ({B.shape[-2]}) and C groups ({C.shape[-2]}) must both divide the heads ({n_heads})")
    return expand_groups(B, g), expand_groups(C, g)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums ``(..., T) -> (..., T, T)``: ``out[..., i, j] = sum_{k=j+1..i} a_k`` for ``i >= j``, else -inf.

    Built by a masked cumulative sum (no differences of large cumulative sums), so it is exact
    for long segments and ``exp(segsum(a))`` is the lower-triangular decay matrix.
    """
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    a = a[..., :, None].expand(*a.shape, T)  # (..., T, T): a[..., i, j] = a_i
    a = a.masked_fill(~torch.tril(ones, diagonal=-1), 0)  # keep i > j
    out = torch.cumsum(a, dim=-2)  # out[i, j] = sum_{j < k <= i} a_k
    return out.masked_fill(~torch.tril(ones), float("-inf"))


def _check(x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    b, L, h, _ = x.shape
    if log_a.shape != (b, L, h):
        raise ValueError(f"log_a has shape {tuple(log_a.shape)}, expected {(b, L, h)}")
    for name, t in (("B", B), ("C", C)):
        if t.ndim != 4 or t.shape[:2] != (b, L) or h % t.shape[2]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (b={b}, L={L}, groups dividing {h}, n)")
    if B.shape[-1] != C.shape[-1]:
        raise ValueError(f"B and C state sizes differ: {B.shape[-1]} vs {C.shape[-1]}")


def ssd_naive(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, one token at a time (the ground truth; slow).

    x (b, L, h, p), log_a (b, L, h), B (b, L, gB, n), C (b, L, gC, n), D (h,) or (h, p),
    initial_state (b, h, p, n), seq_idx (b, L) document ids (the state is reset to 0 where the id
    changes) -> y (b, L, h, p) in x's dtype, final state (b, h, p, n).
    """
    _check(x, log_a, B, C)
    state = initial_state
    ys = []
    for t in range(x.shape[1]):
        if seq_idx is not None and t > 0 and state is not None:
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1]).to(state.dtype)  # (b,)
            state = state * (1 - new_doc)[:, None, None, None]
        y_t, state = ssd_step(x[:, t], log_a[:, t], B[:, t], C[:, t], D=D, state=state)
        ys.append(y_t)
    if state is None:  # L == 0
        b, _, h, p = x.shape
        state = x.new_zeros(b, h, p, B.shape[-1], dtype=compute_dtype(x.dtype))
    y = torch.stack(ys, dim=1) if ys else x.clone()
    return y, state


def ssd_step(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step.

    x (b, h, p), log_a (b, h), B (b, gB, n), C (b, gC, n), state (b, h, p, n) or None (zeros)
    -> y (b, h, p) in x's dtype, new state (b, h, p, n) in the compute dtype (float32 for half inputs).
    """
    b, h, p = x.shape
    dtype = compute_dtype(x.dtype)
    Bh = expand_groups(B, h, "B").to(dtype)  # (b, h, n)
    Ch = expand_groups(C, h, "C").to(dtype)  # (b, h, n)
    xf = x.to(dtype)
    if state is None:
        state = xf.new_zeros(b, h, p, Bh.shape[-1])
    decay = torch.exp(log_a.to(dtype))[:, :, None, None]  # (b, h, 1, 1)
    state = decay * state.to(dtype) + xf[..., :, None] * Bh[:, :, None, :]  # (b, h, p, n)
    y = (state * Ch[:, :, None, :]).sum(-1)  # (b, h, p): elementwise, so a compiled step fuses it with the update
    if D is not None:
        y = y + skip_term(D, xf)
    return y.to(x.dtype), state


def skip_term(D: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``D x`` for D of shape (h,) or (h, p) and x (..., h, p)."""
    D = D.to(x.dtype)
    return x * (D[:, None] if D.ndim == 1 else D)


def ssd_chunked(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD (the paper's Listing 1 generalised to head groups, any length, initial state).

    Within a chunk of ``Q = chunk_size`` tokens the output is the quadratic (attention-like) form;
    between chunks states are passed by a recurrence over chunk boundaries. ``L`` need not be a
    multiple of ``Q`` (the tail is padded with no-op tokens: decay 1, zero input).

    x (b, L, h, p), log_a (b, L, h), B (b, L, gB, n), C (b, L, gC, n), D (h,) or (h, p),
    initial_state (b, h, p, n), seq_idx (b, L) non-decreasing document ids of packed sequences
    (no term crosses a change of id; ``initial_state`` belongs to the first document)
    -> y (b, L, h, p) in x's dtype, final state (b, h, p, n) in the compute dtype.
    """
    _check(x, log_a, B, C)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, L, h, p = x.shape
    dtype = compute_dtype(x.dtype)
    B, C = _common_groups(B, C, h)
    g, n = B.shape[-2], B.shape[-1]
    r = h // g  # heads per group
    Q = min(chunk_size, max(L, 1))
    pad = (-L) % Q
    c = (L + pad) // Q  # number of chunks

    xf = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))  # (b, c*Q, h, p)
    af = F.pad(log_a.to(dtype), (0, 0, 0, pad))  # (b, c*Q, h); padded tokens: decay 1
    Bf = F.pad(B.to(dtype), (0, 0, 0, 0, 0, pad))  # (b, c*Q, g, n)
    Cf = F.pad(C.to(dtype), (0, 0, 0, 0, 0, pad))  # (b, c*Q, g, n)

    X = xf.reshape(b, c, Q, g, r, p)  # (b, c, l, g, r, p)
    Bc = Bf.reshape(b, c, Q, g, n)  # (b, c, l, g, n)
    Cc = Cf.reshape(b, c, Q, g, n)  # (b, c, l, g, n)
    A = af.reshape(b, c, Q, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, l)
    A_cs = torch.cumsum(A, dim=-1)  # (b, g, r, c, l)
    docs = _document_masks(seq_idx, b, c, Q, pad) if seq_idx is not None else None

    # 1. intra-chunk (diagonal blocks): y_l = sum_{s<=l} (C_l . B_s) decay(l, s) x_s
    decay = torch.exp(segsum(A))  # (b, g, r, c, l, s)
    if docs is not None:
        decay = decay * docs.same[:, None, None].to(dtype)
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # (b, c, g, l, s)
    W = CB[:, :, :, None] * decay.permute(0, 3, 1, 2, 4, 5)  # (b, c, g, r, l, s)
    y_diag = torch.einsum("bcgrls,bcsgrp->bclgrp", W, X)  # (b, c, l, g, r, p)

    # 2. state contributed by each chunk, at its end
    decay_to_end = torch.exp(A_cs[..., -1:] - A_cs)  # (b, g, r, c, l)
    if docs is not None:
        decay_to_end = decay_to_end * docs.to_end[:, None, None].to(dtype)
    Xd = X * decay_to_end.permute(0, 3, 4, 1, 2)[..., None]  # (b, c, l, g, r, p)
    states = torch.einsum("bclgn,bclgrp->bcgrpn", Bc, Xd)  # (b, c, g, r, p, n)

    # 3. pass states across chunk boundaries (a recurrence over c + 1 boundaries)
    if initial_state is None:
        init = states.new_zeros(b, 1, g, r, p, n)
    else:
        if initial_state.shape != (b, h, p, n):
            raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected {(b, h, p, n)}")
        init = initial_state.to(dtype).reshape(b, 1, g, r, p, n)
    states = torch.cat([init, states], dim=1)  # (b, c+1, g, r, p, n)
    chunk_log_decay = A_cs[..., -1]  # (b, g, r, c): decay of the entering state across each chunk
    if docs is not None:  # a document starting inside a chunk cuts the state entering it
        chunk_log_decay = chunk_log_decay.masked_fill(~docs.keeps[:, None, None], float("-inf"))
    chunk_decay = torch.exp(segsum(F.pad(chunk_log_decay, (1, 0))))  # (b, g, r, c+1, c+1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)  # (b, c+1, g, r, p, n)
    states, final = states[:, :-1], states[:, -1]  # (b, c, g, r, p, n), (b, g, r, p, n)

    # 4. contribution of the state entering each chunk: y_l += decay(l, start) C_l . H_start
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", Cc, states)  # (b, c, l, g, r, p)
    y_off = y_off * torch.exp(A_cs).permute(0, 3, 4, 1, 2)[..., None]
    if docs is not None:
        y_off = y_off * docs.sees_entering[..., None, None, None].to(dtype)

    y = (y_diag + y_off).reshape(b, c * Q, h, p)[:, :L]  # (b, L, h, p)
    if D is not None:
        y = y + skip_term(D, xf[:, :L])
    return y.to(x.dtype), final.reshape(b, h, p, n)


class _DocumentMasks:
    """Which terms of the chunked SSD stay inside one packed document (all ``bool``).

    ``same (b, c, l, s)``: tokens l and s of a chunk share a document; ``to_end (b, c, l)``: token
    l is in the document of its chunk's last token; ``keeps (b, c)``: the state entering chunk c
    survives it; ``sees_entering (b, c, l)``: token l is in the entering state's document.
    """

    def __init__(self, same: torch.Tensor, to_end: torch.Tensor, keeps: torch.Tensor, sees: torch.Tensor) -> None:
        self.same, self.to_end, self.keeps, self.sees_entering = same, to_end, keeps, sees


def _document_masks(seq_idx: torch.Tensor, b: int, c: int, Q: int, pad: int) -> _DocumentMasks:
    if seq_idx.shape[0] != b or seq_idx.ndim != 2:
        raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)}, expected (b={b}, L)")
    S = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1).reshape(b, c, Q)  # padding: last document
    end = S[..., -1]  # (b, c)
    entering = torch.cat([S[:, :1, 0], end[:, :-1]], dim=1)  # (b, c): the document of the state entering chunk c
    return _DocumentMasks(
        same=S[..., :, None] == S[..., None, :],
        to_end=S == end[..., None],
        keeps=end == entering,
        sees=S == entering[..., None],
    )


def ssd_matrix(
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The materialised mixing matrix ``M (b, h, L, L)``; rows are output positions.

    ``M[l, s] = (C_l . B_s) * exp(sum_{k=s+1..l} log_a_k) * input_scale_s`` for ``l >= s``, plus
    ``D`` on the diagonal, so that ``y[:, l, h] = sum_s M[:, h, l, s] x[:, s, h]`` for the SSM with
    input ``input_scale * x`` (Mamba-2's ``dt``; None means 1). Memory grows as ``L^2``.

    log_a (b, L, h), B (b, L, gB, n), C (b, L, gC, n), D (h,), input_scale (b, L, h).
    Returned in log_a's compute dtype.
    """
    b, L, h = log_a.shape
    dtype = compute_dtype(log_a.dtype)
    Bh = expand_groups(B, h, "B").to(dtype)  # (b, L, h, n)
    Ch = expand_groups(C, h, "C").to(dtype)  # (b, L, h, n)
    CB = torch.einsum("blhn,bshn->bhls", Ch, Bh)  # (b, h, L, L)
    M = CB * torch.exp(segsum(log_a.to(dtype).transpose(1, 2)))  # (b, h, L, L), zero above the diagonal
    if input_scale is not None:
        M = M * input_scale.to(dtype).transpose(1, 2)[:, :, None, :]  # scale column s by dt_s
    if D is not None:
        if D.ndim != 1:
            raise ValueError("ssd_matrix needs D per head (h,)")
        M = M + torch.diag_embed(D.to(dtype)[None, :, None].expand(b, h, L))
    return M
