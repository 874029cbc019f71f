"""Plain-torch references for the structured mixers that are not SSD: Toeplitz and diagonal-decay semiseparable.

Both are matrix mixers in the sense of MOHAWK (Bick et al. 2024, arXiv 2408.10189, sec. 3):
per head, ``y = M x`` with a causal ``L x L`` matrix ``M``.

* **Toeplitz** (a causal global convolution): ``M[l, s] = k[l - s]`` for ``0 <= l - s < K``; input-independent.
  :func:`toeplitz_conv` runs it by FFT, :func:`toeplitz_matrix` materialises it, and :func:`toeplitz_step`
  is one decoding step from a window of the last ``K - 1`` inputs.
* **Semiseparable with a diagonal transition** (Mamba-1 / GLA style; Yang et al. 2023, arXiv 2312.06635):
  ``H_t = H_{t-1} diag(a_t) + x_t B_t^T``, ``y_t = H_t C_t``, a decay per state dimension, so
  ``M[l, s] = sum_n C_l[n] B_s[n] exp(sum_{s<k<=l} log_a_k[n])``. :func:`gla_chunked` (chunked, every
  exponent <= 0, so it is stable), :func:`gla_naive` (token by token), :func:`gla_step` and
  :func:`gla_matrix` (materialised by chunk blocks, never an ``L x L x n`` tensor).

SSD (a scalar decay per head) and linear attention (no decay) live in :mod:`surgery.ops.ssd_reference`.
Nothing here imports triton.
"""

from __future__ import annotations

import torch

from .ssd_reference import compute_dtype

__all__ = [
    "expand_heads",
    "gla_chunked",
    "gla_matrix",
    "gla_naive",
    "gla_step",
    "toeplitz_conv",
    "toeplitz_matrix",
    "toeplitz_step",
]


def expand_heads(t: torch.Tensor, h: int, dim: int = 2) -> torch.Tensor:
    """Repeat grouped heads along ``dim`` to ``h`` heads (head ``i`` reads group ``i // (h / g)``)."""
    g = t.shape[dim]
    if g == h:
        return t
    if h % g:
        raise ValueError(f"{g} groups do not divide {h} heads")
    return t.repeat_interleave(h // g, dim=dim)


# ---------------------------------------------------------------------------------------------- Toeplitz


def toeplitz_matrix(kernel: torch.Tensor, L: int) -> torch.Tensor:
    """``kernel (h, K)`` -> ``M (h, L, L)`` with ``M[h, l, s] = kernel[h, l - s]`` (0 outside ``0 <= l - s < K``)."""
    h, K = kernel.shape
    lag = torch.arange(L, device=kernel.device)[:, None] - torch.arange(L, device=kernel.device)[None, :]  # (L, L)
    inside = (lag >= 0) & (lag < K)
    padded = torch.cat([kernel, kernel.new_zeros(h, 1)], dim=1)  # (h, K+1): index K is a zero
    index = torch.where(inside, lag, torch.full_like(lag, K))  # (L, L)
    return padded[:, index]  # (h, L, L)


def toeplitz_conv(x: torch.Tensor, kernel: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    """Causal convolution per head by FFT: ``y[t] = sum_j kernel[j] x[t - j]``.

    x (b, L, h, p), kernel (h, K), history (b, h, p, K-1) (the inputs before ``x``; None: zeros)
    -> y (b, L, h, p) in x's dtype (computed in the compute dtype).
    """
    b, L, h, p = x.shape
    K = kernel.shape[1]
    dtype = compute_dtype(x.dtype)
    xt = x.to(dtype).permute(0, 2, 3, 1)  # (b, h, p, L)
    if history is not None:
        xt = torch.cat([history.to(dtype), xt], dim=-1)  # (b, h, p, K-1+L)
    n = xt.shape[-1] + K  # linear (not circular) convolution length
    yf = torch.fft.rfft(xt, n=n) * torch.fft.rfft(kernel.to(dtype), n=n)[None, :, None, :]  # (b, h, p, n/2+1)
    y = torch.fft.irfft(yf, n=n)[..., xt.shape[-1] - L : xt.shape[-1]]  # (b, h, p, L): the current tokens
    return y.permute(0, 3, 1, 2).to(x.dtype)


def toeplitz_step(x: torch.Tensor, kernel: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: x (b, h, p), kernel (h, K), window (b, h, p, K-1) of past inputs (oldest first)
    -> y (b, h, p), new window."""
    full = torch.cat([window.to(x.dtype), x[..., None]], dim=-1)  # (b, h, p, K): oldest ... current
    y = torch.einsum("bhpk,hk->bhp", full, kernel.flip(-1).to(x.dtype))  # kernel[0] meets the current token
    return y, full[..., 1:]


# ------------------------------------------------------------------------------------- diagonal decay (GLA)


def gla_naive(
    x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, initial_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence (the definition; for tests).

    x (b, L, h, p), log_a (b, L, h, n) <= 0, B / C (b, L, g, n) with g dividing h
    -> y (b, L, h, p), final state (b, h, p, n).
    """
    b, L, h, p = x.shape
    n = B.shape[-1]
    dtype = compute_dtype(x.dtype)
    B, C = expand_heads(B, h).to(dtype), expand_heads(C, h).to(dtype)
    state = x.new_zeros(b, h, p, n, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(L):
        y, state = gla_step(x[:, t], log_a[:, t], B[:, t], C[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1).to(x.dtype), state


def gla_step(
    x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: x (b, h, p), log_a (b, h, n), B / C (b, g, n), state (b, h, p, n) -> y (b, h, p), new state."""
    h = x.shape[1]
    dtype = state.dtype
    B, C = expand_heads(B, h, 1).to(dtype), expand_heads(C, h, 1).to(dtype)
    state = state * torch.exp(log_a.to(dtype))[:, :, None, :] + x.to(dtype)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return y.to(x.dtype), state


def _chunks(t: torch.Tensor, Q: int) -> torch.Tensor:
    """(b, L, ...) -> (b, c, Q, ...), zero-padding L up to a multiple of Q."""
    L = t.shape[1]
    pad = (-L) % Q
    if pad:
        t = torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)
    return t.reshape(t.shape[0], -1, Q, *t.shape[2:])


def _intra_scores(log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Within-chunk matrix blocks: log_a, B, C (b, c, Q, h, n) -> (b, c, h, Q, Q), rows l >= columns s.

    ``sum_n C_l B_s exp(cum_l - cum_s)`` with the exponent masked to -inf above the diagonal (never > 0).
    """
    Q = log_a.shape[2]
    cum = torch.cumsum(log_a, dim=2)  # (b, c, Q, h, n)
    diff = cum[:, :, :, None] - cum[:, :, None, :]  # (b, c, Ql, Qs, h, n)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=log_a.device).tril()[None, None, :, :, None, None]
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    return torch.einsum("bclhn,bcshn,bclshn->bchls", C, B, decay)


def gla_chunked(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form of :func:`gla_naive` (same arguments; results do not depend on ``chunk_size``).

    Per chunk of ``Q`` tokens: the within-chunk blocks (:func:`_intra_scores`), plus the state entering
    the chunk read through ``C_l exp(cum_l)``; the state is carried across chunks by ``exp(cum_Q)``.
    Every exponent is a sum of log-decays over a forward span, so it is <= 0: no overflow.
    """
    b, L, h, p = x.shape
    n = B.shape[-1]
    dtype = compute_dtype(x.dtype)
    Q = min(chunk_size, L)
    xc = _chunks(x.to(dtype), Q)  # (b, c, Q, h, p)
    ac = _chunks(log_a.to(dtype), Q)  # (b, c, Q, h, n); padding: decay 1, no input
    Bc = _chunks(expand_heads(B, h).to(dtype), Q)  # (b, c, Q, h, n)
    Cc = _chunks(expand_heads(C, h).to(dtype), Q)
    cum = torch.cumsum(ac, dim=2)  # (b, c, Q, h, n)
    total = cum[:, :, -1]  # (b, c, h, n): log-decay across each chunk
    y = torch.einsum("bchls,bcshp->bclhp", _intra_scores(ac, Bc, Cc), xc)  # (b, c, Q, h, p)
    # contribution of each chunk's inputs to its end state: x_s B_s^T exp(total - cum_s)
    chunk_states = torch.einsum("bcshp,bcshn->bchpn", xc, Bc * torch.exp(total[:, :, None] - cum))  # (b, c, h, p, n)
    state = x.new_zeros(b, h, p, n, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    outs = []
    for c in range(xc.shape[1]):  # the state entering chunk c, read by C_l exp(cum_l)
        outs.append(torch.einsum("bhpn,blhn->blhp", state, Cc[:, c] * torch.exp(cum[:, c])))
        state = state * torch.exp(total[:, c])[:, :, None, :] + chunk_states[:, c]
    y = y + torch.stack(outs, 1)  # (b, c, Q, h, p)
    return y.reshape(b, -1, h, p)[:, :L].to(x.dtype), state


def gla_matrix(log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """The mixing matrix ``M (b, h, L, L)`` of :func:`gla_chunked` (rows: outputs), in the compute dtype.

    log_a (b, L, h, n), B / C (b, L, g, n). Block ``(i, j)`` of chunks ``j < i`` is
    ``(C_i exp(cum_i)) diag(exp(G_{i-1} - G_j)) (B_j exp(total_j - cum_j))^T`` with ``G`` the log-decay
    at chunk ends, every exponent <= 0; the diagonal blocks are :func:`_intra_scores`.
    """
    b, L, h, n = log_a.shape
    dtype = compute_dtype(log_a.dtype)
    Q = min(chunk_size, L)
    ac = _chunks(log_a.to(dtype), Q)  # (b, c, Q, h, n)
    Bc = _chunks(expand_heads(B, h).to(dtype), Q)
    Cc = _chunks(expand_heads(C, h).to(dtype), Q)
    c = ac.shape[1]
    cum = torch.cumsum(ac, dim=2)  # (b, c, Q, h, n)
    total = cum[:, :, -1]  # (b, c, h, n)
    G = torch.cumsum(total, dim=1)  # (b, c, h, n): log-decay from the start to the end of chunk c
    G_before = G - total  # (b, c, h, n): ... to the start of chunk c
    between = G_before[:, :, None] - G[:, None, :]  # (b, ci, cj, h, n): end of chunk j to start of chunk i
    strictly_before = torch.ones(c, c, dtype=torch.bool, device=log_a.device).tril(-1)[None, :, :, None, None]
    between = torch.exp(between.masked_fill(~strictly_before, float("-inf")))  # 0 where j >= i
    Cin = Cc * torch.exp(cum)  # (b, c, Q, h, n)
    Bout = Bc * torch.exp(total[:, :, None] - cum)  # (b, c, Q, h, n)
    off = torch.einsum("bilhn,bijhn,bjshn->bhiljs", Cin, between, Bout)  # (b, h, ci, Q, cj, Q)
    diag = _intra_scores(ac, Bc, Cc)  # (b, c, h, Q, Q)
    M = off.permute(0, 1, 3, 5, 2, 4) + torch.diag_embed(diag.permute(0, 2, 3, 4, 1))  # (b, h, Q, Q, ci, cj)
    return M.permute(0, 1, 4, 2, 5, 3).reshape(b, h, c * Q, c * Q)[:, :, :L, :L]
