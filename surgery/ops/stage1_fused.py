"""MOHAWK stage 1 without any ``L x L`` tensor: ``||M - P||_F^2`` per (batch, head), in Triton.

``P = softmax(scale q k^T)`` (causal) is the teacher's attention as it was computed (post-RoPE
``q (b, h, L, d)``, ``k (b, hk, L, d)``, ``hk`` dividing ``h``); ``M[l, s] = (C_l . B_s)
exp(g_l - g_s) w_s`` for ``l >= s`` (plus ``D`` on the diagonal) is the student's SSD mixing
matrix (Bick et al. 2024, arXiv 2408.10189, sec. 4.1; ``w`` is Mamba-2's ``dt``, 1 for discrete
Mamba-2). Flash-attention style (Dao et al. 2022, arXiv 2205.14135): a first pass over key
blocks gives each row's max and normaliser; a second pass, per row block, forms the ``P``, ``M``
tiles and their difference, summing the squares and -- when gradients are wanted -- the
gradients for ``C`` and the row part of ``dg``; a third pass, per key block, the gradients for
``B``, ``w`` and the column part of ``dg`` (no atomics: deterministic). Gradients are of the
per-(batch, head) sum of squares; the autograd wrapper scales them by the upstream gradient.
``d log_a`` follows from ``dg`` by a reverse cumulative sum, as in :mod:`surgery.ops.ssd_fused`.

The cumulative log-decay ``g`` is kept in float64 so that ``g_l - g_s`` stays exact far into long
sequences (the difference of two large float32 sums would not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surgery.ops import launch_limits

__all__ = ["CONFIG", "squared_distance_fused"]

CONFIG = {"block_m": 64, "block_n": 64, "num_warps": 8}


@triton.jit
def _tile(ptr, rows, rows_ok, cols, cols_ok, stride_row):
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)


@triton.jit
def _logits(q, k_ptr, s, s_ok, offs_d, d_ok, s_kl, scale, l, l_ok):
    """Causal, scaled attention logits of a (rows x keys) tile; -inf outside."""
    k = _tile(k_ptr, s, s_ok, offs_d, d_ok, s_kl)  # (BN, BD)
    z = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # (BM, BN)
    ok = (l[:, None] >= s[None, :]) & l_ok[:, None] & s_ok[None, :]
    return tl.where(ok, z, float("-inf")), ok


@triton.jit
def _student(C, B_ptr, g_ptr, w_ptr, s, s_ok, offs_n, n_ok, s_Bl, s_gl, s_wl, g_l, ok, HAS_W: tl.constexpr):
    """The student's matrix tile without D: ``S o E`` (with ``S = (C B^T) w``), and ``S``, ``E``."""
    Bt = _tile(B_ptr, s, s_ok, offs_n, n_ok, s_Bl)  # (BN, BNs)
    S = tl.dot(C, tl.trans(Bt)).to(tl.float32)  # (BM, BN)
    if HAS_W:
        S = S * tl.load(w_ptr + s * s_wl, mask=s_ok, other=0.0).to(tl.float32)[None, :]
    g_s = tl.load(g_ptr + s * s_gl, mask=s_ok, other=0.0)  # float64
    E = tl.exp(tl.where(ok, (g_l[:, None] - g_s[None, :]).to(tl.float32), float("-inf")))
    return S * E, S, E, Bt


@triton.jit
def _row_stats(
    q_ptr, k_ptr, m_ptr, z_ptr, L, h, heads_per_k, D_HEAD, scale,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    rb, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // h, pid_bh % h
    l = rb * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    l_ok, d_ok = l < L, offs_d < D_HEAD
    q = _tile(q_ptr + b * s_qb + hh * s_qh, l, l_ok, offs_d, d_ok, s_ql)  # (BM, BD)
    k_ptr = k_ptr + b * s_kb + (hh // heads_per_k) * s_kh
    m = tl.full((BM,), float("-inf"), dtype=tl.float32)
    zsum = tl.zeros((BM,), dtype=tl.float32)
    for kb in range(0, tl.cdiv((rb + 1) * BM, BN)):
        s = kb * BN + tl.arange(0, BN)
        z, _ = _logits(q, k_ptr, s, s < L, offs_d, d_ok, s_kl, scale, l, l_ok)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        zsum = zsum * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + pid_bh * L + l, m, mask=l_ok)
    tl.store(z_ptr + pid_bh * L + l, zsum, mask=l_ok)


@triton.jit
def _rows_pass(
    q_ptr, k_ptr, m_ptr, z_ptr, g_ptr, B_ptr, C_ptr, w_ptr, D_ptr,
    loss_ptr, dC_ptr, dgq_ptr, dD_ptr,
    L, h, heads_per_k, heads_per_B, heads_per_C, D_HEAD, N, scale, n_rb,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_gb, s_gl, s_gh, s_Bb, s_Bl, s_Bg, s_Cb, s_Cl, s_Cg, s_wb, s_wl, s_wh,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BNS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_D: tl.constexpr, GRAD: tl.constexpr,
):
    rb, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // h, pid_bh % h
    l = rb * BM + tl.arange(0, BM)
    offs_d, offs_n = tl.arange(0, BD), tl.arange(0, BNS)
    l_ok, d_ok, n_ok = l < L, offs_d < D_HEAD, offs_n < N
    q = _tile(q_ptr + b * s_qb + hh * s_qh, l, l_ok, offs_d, d_ok, s_ql)
    k_ptr = k_ptr + b * s_kb + (hh // heads_per_k) * s_kh
    C = _tile(C_ptr + b * s_Cb + (hh // heads_per_C) * s_Cg, l, l_ok, offs_n, n_ok, s_Cl)  # (BM, BNS)
    B_ptr = B_ptr + b * s_Bb + (hh // heads_per_B) * s_Bg
    g_ptr = g_ptr + b * s_gb + hh * s_gh
    w_ptr = w_ptr + b * s_wb + hh * s_wh
    g_l = tl.load(g_ptr + l * s_gl, mask=l_ok, other=0.0)
    m = tl.load(m_ptr + pid_bh * L + l, mask=l_ok, other=0.0)
    inv_z = 1.0 / tl.load(z_ptr + pid_bh * L + l, mask=l_ok, other=1.0)
    d_val = tl.load(D_ptr + hh).to(tl.float32) if HAS_D else 0.0
    total = tl.zeros((BM,), dtype=tl.float32)
    dC = tl.zeros((BM, BNS), dtype=tl.float32)
    dgq = tl.zeros((BM,), dtype=tl.float32)
    dD = tl.zeros((BM,), dtype=tl.float32)
    for kb in range(0, tl.cdiv((rb + 1) * BM, BN)):
        s = kb * BN + tl.arange(0, BN)
        s_ok = s < L
        z, ok = _logits(q, k_ptr, s, s_ok, offs_d, d_ok, s_kl, scale, l, l_ok)
        P = tl.exp(z - m[:, None]) * inv_z[:, None]  # (BM, BN), 0 outside the causal mask
        SE, S, E, Bt = _student(C, B_ptr, g_ptr, w_ptr, s, s_ok, offs_n, n_ok, s_Bl, s_gl, s_wl, g_l, ok, HAS_W)
        diag = (l[:, None] == s[None, :]) & ok
        R = SE + tl.where(diag, d_val, 0.0) - P
        total += tl.sum(R * R, axis=1)
        if GRAD:
            dM = 2.0 * R
            dSE = dM * E  # d/d(S) of the sum of squares
            if HAS_W:
                dSE = dSE * tl.load(w_ptr + s * s_wl, mask=s_ok, other=0.0).to(tl.float32)[None, :]
            dC += tl.dot(dSE.to(Bt.dtype), Bt).to(tl.float32)  # (BM, BN) @ (BN, BNS)
            dgq += tl.sum(dM * SE, axis=1)
            dD += tl.sum(tl.where(diag, dM, 0.0), axis=1)
    tl.store(loss_ptr + pid_bh * n_rb + rb, tl.sum(total, axis=0))
    if GRAD:
        tl.store(dC_ptr + ((b * L + l[:, None]) * h + hh) * N + offs_n[None, :], dC, mask=l_ok[:, None] & n_ok[None, :])
        tl.store(dgq_ptr + (b * L + l) * h + hh, dgq, mask=l_ok)
        tl.store(dD_ptr + pid_bh * n_rb + rb, tl.sum(dD, axis=0))


@triton.jit
def _cols_pass(
    q_ptr, k_ptr, m_ptr, z_ptr, g_ptr, B_ptr, C_ptr, w_ptr, D_ptr,
    dB_ptr, dgk_ptr, dw_ptr,
    L, h, heads_per_k, heads_per_B, heads_per_C, D_HEAD, N, scale,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_gb, s_gl, s_gh, s_Bb, s_Bl, s_Bg, s_Cb, s_Cl, s_Cg, s_wb, s_wl, s_wh,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BNS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_D: tl.constexpr,
):
    cb, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // h, pid_bh % h
    s = cb * BN + tl.arange(0, BN)
    offs_d, offs_n = tl.arange(0, BD), tl.arange(0, BNS)
    s_ok, d_ok, n_ok = s < L, offs_d < D_HEAD, offs_n < N
    k_ptr = k_ptr + b * s_kb + (hh // heads_per_k) * s_kh
    q_ptr = q_ptr + b * s_qb + hh * s_qh
    C_ptr = C_ptr + b * s_Cb + (hh // heads_per_C) * s_Cg
    B_ptr = B_ptr + b * s_Bb + (hh // heads_per_B) * s_Bg
    g_ptr = g_ptr + b * s_gb + hh * s_gh
    w_ptr = w_ptr + b * s_wb + hh * s_wh
    Bt = _tile(B_ptr, s, s_ok, offs_n, n_ok, s_Bl)  # (BN, BNS)
    g_s = tl.load(g_ptr + s * s_gl, mask=s_ok, other=0.0)
    if HAS_W:
        w_s = tl.load(w_ptr + s * s_wl, mask=s_ok, other=0.0).to(tl.float32)
    d_val = tl.load(D_ptr + hh).to(tl.float32) if HAS_D else 0.0
    dB = tl.zeros((BN, BNS), dtype=tl.float32)
    dgk = tl.zeros((BN,), dtype=tl.float32)
    dw = tl.zeros((BN,), dtype=tl.float32)
    for rb in range((cb * BN) // BM, tl.cdiv(L, BM)):
        l = rb * BM + tl.arange(0, BM)
        l_ok = l < L
        q = _tile(q_ptr, l, l_ok, offs_d, d_ok, s_ql)
        z, ok = _logits(q, k_ptr, s, s_ok, offs_d, d_ok, s_kl, scale, l, l_ok)
        m = tl.load(m_ptr + pid_bh * L + l, mask=l_ok, other=0.0)
        inv_z = 1.0 / tl.load(z_ptr + pid_bh * L + l, mask=l_ok, other=1.0)
        P = tl.exp(z - m[:, None]) * inv_z[:, None]
        C = _tile(C_ptr, l, l_ok, offs_n, n_ok, s_Cl)  # (BM, BNS)
        S = tl.dot(C, tl.trans(Bt)).to(tl.float32)  # (BM, BN), without w
        g_l = tl.load(g_ptr + l * s_gl, mask=l_ok, other=0.0)
        E = tl.exp(tl.where(ok, (g_l[:, None] - g_s[None, :]).to(tl.float32), float("-inf")))
        SE = S * E
        if HAS_W:
            SE = SE * w_s[None, :]
        diag = (l[:, None] == s[None, :]) & ok
        dM = 2.0 * (SE + tl.where(diag, d_val, 0.0) - P)
        dSE = dM * E
        if HAS_W:
            dw += tl.sum(dSE * S, axis=0)
            dSE = dSE * w_s[None, :]
        dB += tl.dot(tl.trans(dSE).to(C.dtype), C).to(tl.float32)  # (BN, BM) @ (BM, BNS)
        dgk += tl.sum(dM * SE, axis=0)
    tl.store(dB_ptr + ((b * L + s[:, None]) * h + hh) * N + offs_n[None, :], dB, mask=s_ok[:, None] & n_ok[None, :])
    tl.store(dgk_ptr + (b * L + s) * h + hh, dgk, mask=s_ok)
    if HAS_W:
        tl.store(dw_ptr + (b * L + s) * h + hh, dw, mask=s_ok)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class _SquaredDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, log_a, B, C, D, w):  # type: ignore[override]
        b, h, L, d = q.shape
        hk, gB, gC, N = k.shape[1], B.shape[2], C.shape[2], B.shape[3]
        BM, BN, warps = CONFIG["block_m"], CONFIG["block_n"], CONFIG["num_warps"]
        BD, BNS = _pow2(d), _pow2(N)
        n_rb = triton.cdiv(L, BM)
        dev = q.device
        g = log_a.double().cumsum(1).contiguous()  # (b, L, h) float64
        m = torch.empty(b * h, L, device=dev, dtype=torch.float32)
        zs = torch.empty_like(m)
        strides = (*q.stride()[:3], *k.stride()[:3], *g.stride(), *B.stride()[:3], *C.stride()[:3])
        w_arg, s_w = (w, w.stride()) if w is not None else (g, (0, 0, 0))
        D_arg = D if D is not None else g
        _row_stats[(n_rb, b * h)](q, k, m, zs, L, h, h // hk, d, scale, *q.stride()[:3], *k.stride()[:3],
                                  BM=BM, BN=BN, BD=BD, num_warps=warps)
        grad = any(ctx.needs_input_grad[3:])
        loss = torch.empty(b * h, n_rb, device=dev, dtype=torch.float32)
        dC = torch.empty(b, L, h, N, device=dev, dtype=torch.float32) if grad else loss
        dgq = torch.empty(b, L, h, device=dev, dtype=torch.float32) if grad else loss
        dD = torch.empty(b * h, n_rb, device=dev, dtype=torch.float32) if grad else loss
        _rows_pass[(n_rb, b * h)](
            q, k, m, zs, g, B, C, w_arg, D_arg, loss, dC, dgq, dD,
            L, h, h // hk, h // gB, h // gC, d, N, scale, n_rb, *strides, *s_w,
            BM=BM, BN=BN, BD=BD, BNS=BNS, HAS_W=w is not None, HAS_D=D is not None, GRAD=grad, num_warps=warps,
        )
        if grad:
            dB = torch.empty(b, L, h, N, device=dev, dtype=torch.float32)
            dgk = torch.empty(b, L, h, device=dev, dtype=torch.float32)
            dw = torch.empty(b, L, h, device=dev, dtype=torch.float32) if w is not None else dgk
            _cols_pass[(triton.cdiv(L, BN), b * h)](
                q, k, m, zs, g, B, C, w_arg, D_arg, dB, dgk, dw,
                L, h, h // hk, h // gB, h // gC, d, N, scale, *strides, *s_w,
                BM=BM, BN=BN, BD=BD, BNS=BNS, HAS_W=w is not None, HAS_D=D is not None, num_warps=warps,
            )
            dg = dgq - dgk
            ctx.save_for_backward(dg.flip(1).cumsum(1).flip(1), dB, dC, dD.view(b, h, n_rb).sum(-1),
                                  dw if w is not None else None)
        ctx.shapes = (gB, gC, D is not None, log_a.dtype, B.dtype, C.dtype, None if D is None else D.dtype,
                      None if w is None else w.dtype)
        return loss.view(b, h, n_rb).sum(-1)  # (b, h)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        dlog_a, dB, dC, dD, dw = ctx.saved_tensors
        gB, gC, has_D, a_dt, B_dt, C_dt, D_dt, w_dt = ctx.shapes
        b, L, h, N = dB.shape
        go = grad_out.float()  # (b, h)
        per_token = go[:, None, :]  # (b, 1, h)
        dB = (dB * per_token[..., None]).view(b, L, gB, h // gB, N).sum(3)
        dC = (dC * per_token[..., None]).view(b, L, gC, h // gC, N).sum(3)
        out_D = (dD * go).sum(0).to(D_dt) if has_D else None
        out_w = (dw * per_token).to(w_dt) if dw is not None else None
        return None, None, None, (dlog_a * per_token).to(a_dt), dB.to(B_dt), dC.to(C_dt), out_D, out_w


def squared_distance_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||M - P||_F^2`` per (batch, head) -> (b, h) float32; differentiable in the student's tensors.

    q (b, h, L, d), k (b, hk, L, d) (the teacher's, no gradient), log_a (b, L, h), B (b, L, gB, n),
    C (b, L, gC, n), D (h,), w (b, L, h) column scale. ``B``/``C`` are cast to ``q``'s dtype for the dots.
    """
    dtype = q.dtype
    q, k = q.detach().contiguous(), k.detach().to(dtype).contiguous()
    log_a, B, C = log_a.contiguous(), B.to(dtype).contiguous(), C.to(dtype).contiguous()
    w = None if w is None else w.contiguous()
    # rows are independent: slices keep every launch grid (batch x head on its y axis) inside CUDA's limit
    return torch.cat([
        _SquaredDistance.apply(q[r], k[r], float(scale), log_a[r], B[r], C[r], D, None if w is None else w[r])
        for r in launch_limits.batch_slices(q.shape[0], q.shape[1])
    ])
