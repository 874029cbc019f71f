"""Fused chunked SSD for the decay form, forward and backward, in Triton.

The scalar-decay SSM of discrete Mamba-2 (Dao & Gu 2024, arXiv 2405.21060, sec. 6; Bick et al.
2024, arXiv 2408.10189), per head ``h``::

    H_t = exp(log_a_t) H_{t-1} + x_t B_t^T        y_t = H_t C_t + D x_t

computed by the chunked algorithm of the SSD paper in four Triton kernels, specialised for
what students use (head dim and state 16-128, ``B`` and ``C`` shared by groups of heads), all
parallel over chunks except a light element-wise scan:

* ``_chunk_states``: per (chunk, batch, head), the state a chunk adds by its end,
  ``S_c = (x o exp(cs_last - cs))^T B`` (backward: ``T_c = (dy o exp(cs))^T C``, what its
  outputs ask of the state entering it), and the decay ``keep_c`` across it;
* ``_scan_states``: over chunks, element-wise, ``H_{c+1} = keep_c H_c + S_c`` (the state entering
  each chunk, float32, kept for the backward; and the final state) -- backward, the same scan in
  reverse gives the gradient of each chunk's end state;
* ``_fwd_output``: per chunk, ``y = (C B^T o L) x + exp(cs) (C H_c^T) + D x`` with ``L`` the
  in-chunk decay matrix;
* ``_bwd_chunk``: per chunk, ``dx``, ``dB``, ``dC`` (per head; group sums in torch) and
  ``dg_t = C_t . dC_t - B_t . dB_t``, from which ``d log_a`` is a reverse cumulative sum:
  with ``g`` the cumulative log-decay every term of ``y`` and of the final state carries
  ``exp(g_t - g_s)``, so ``dL/dg_t = C_t . dL/dC_t - B_t . dL/dB_t`` (the identity that
  flash-linear-attention uses for gated linear attention, Yang et al. 2024, arXiv 2312.06635),
  plus ``<dL/dH_final, H_final>`` at the last token.

Every exponent is a difference ``cs_t - cs_s`` with ``t >= s`` inside a chunk (or ``cs_t``, ``cs_last
- cs_s``), hence ``<= 0``: nothing overflows however strong the decay. ``seq_idx (b, L)`` marks
packed documents: state and in-chunk terms never cross a change of ``seq_idx`` (the state is
reset at each document start; ``initial_state`` belongs to the first document).

Only :mod:`surgery.ops` imports this module, for CUDA tensors (or under ``TRITON_INTERPRET=1``
in development); the plain-torch reference :func:`surgery.ops.ssd_reference.ssd_chunked` is
what it is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surgery.ops import launch_limits

__all__ = ["ssd_fused"]


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


@triton.jit
def _load_chunk(ptr, t, t_ok, cols, cols_ok, stride_t):
    """(Q, COLS) tile of a (L, cols) view; masked entries are 0."""
    return tl.load(ptr + t[:, None] * stride_t + cols[None, :], mask=t_ok[:, None] & cols_ok[None, :], other=0.0)


@triton.jit
def _chunk_states(
    v_ptr, a_ptr, k_ptr, seq_ptr, out_ptr, keep_ptr,
    L, h, nc, P, N, heads_per_k,
    s_vb, s_vl, s_vh, s_ab, s_al, s_ah, s_kb, s_kl, s_kg, s_qb, s_ql,
    Q: tl.constexpr, BPP: tl.constexpr, BN: tl.constexpr, TO_END: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    """Per (chunk, batch x head): ``out[c] = (v o w)^T k`` (P, N), float32.

    TO_END (forward): v = x, k = B, w_s = exp(cs_last - cs_s) -- the state a chunk adds by its end;
    also writes ``keep[c]``, the decay of the entering state across the chunk (0 across a document start).
    Else (backward): v = dy, k = C, w_t = exp(cs_t) -- what a chunk's outputs ask of its entering state.
    """
    c, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // h, pid_bh % h
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BPP)
    offs_n = tl.arange(0, BN)
    t = c * Q + offs_q
    t_ok, p_ok, n_ok = t < L, offs_p < P, offs_n < N
    a = tl.load(a_ptr + b * s_ab + t * s_al + hh * s_ah, mask=t_ok, other=0.0).to(tl.float32)  # (Q,)
    cs = tl.cumsum(a, axis=0)
    last = tl.sum(a, axis=0)
    if TO_END:
        w = tl.exp(last - cs)
    else:
        w = tl.exp(cs)
    keep = tl.exp(last)
    if HAS_SEQ:
        doc = tl.load(seq_ptr + b * s_qb + t * s_ql, mask=t_ok, other=-1)
        end_doc = tl.max(tl.where(t_ok, doc, -1), axis=0)  # documents are non-decreasing in t
        before = tl.load(seq_ptr + b * s_qb + (c * Q - 1) * s_ql, mask=c > 0, other=-1)
        entering = tl.where(c > 0, before, tl.load(seq_ptr + b * s_qb))  # the entering state's document
        if TO_END:
            w = tl.where(doc == end_doc, w, 0.0)
        else:
            w = tl.where(doc == entering, w, 0.0)
        keep = tl.where(end_doc == entering, keep, 0.0)
    v = _load_chunk(v_ptr + b * s_vb + hh * s_vh, t, t_ok, offs_p, p_ok, s_vl)  # (Q, BPP)
    k = _load_chunk(k_ptr + b * s_kb + (hh // heads_per_k) * s_kg, t, t_ok, offs_n, n_ok, s_kl)  # (Q, BN)
    vw = (v.to(tl.float32) * w[:, None]).to(k.dtype)
    S = tl.dot(tl.trans(vw), k).to(tl.float32)  # (BPP, Q) @ (Q, BN)
    tl.store(out_ptr + (pid_bh * nc + c) * P * N + offs_p[:, None] * N + offs_n[None, :], S,
             mask=p_ok[:, None] & n_ok[None, :])
    if TO_END:
        tl.store(keep_ptr + pid_bh * nc + c, keep)


@triton.jit
def _scan_states(
    states_ptr, keep_ptr, init_ptr, last_ptr, nc, PN,
    BLOCK: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr,
):
    """Across chunks, in place: ``states[c]`` (a chunk's own term) becomes what enters chunk ``c``.

    Forward: ``H_0 = init``, ``H_{c+1} = keep_c H_c + S_c``; ``states[c] <- H_c``, ``last <- H_nc``.
    REVERSE: ``G_nc = init`` (the final state's gradient), ``G_c = keep_c G_{c+1} + T_c``;
    ``states[c] <- G_{c+1}`` (the gradient of chunk c's end state), ``last <- G_0``.
    """
    pid_bh, pid_e = tl.program_id(0), tl.program_id(1)
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    ok = offs < PN
    if HAS_INIT:
        H = tl.load(init_ptr + pid_bh * PN + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        H = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nc):
        if REVERSE:
            c = nc - 1 - i
        else:
            c = i
        ptr = states_ptr + (pid_bh * nc + c) * PN + offs
        own = tl.load(ptr, mask=ok, other=0.0)
        tl.store(ptr, H, mask=ok)
        H = tl.load(keep_ptr + pid_bh * nc + c) * H + own
    tl.store(last_ptr + pid_bh * PN + offs, H, mask=ok)


@triton.jit
def _fwd_output(
    x_ptr, a_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, states_ptr, y_ptr,
    L, h, nc, P, N, heads_per_B, heads_per_C,
    s_xb, s_xl, s_xh, s_ab, s_al, s_ah, s_Bb, s_Bl, s_Bg, s_Cb, s_Cl, s_Cg, s_qb, s_ql, s_yb, s_yl, s_yh,
    Q: tl.constexpr, BPP: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    c, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // h, pid_bh % h
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BPP)
    offs_n = tl.arange(0, BN)
    t = c * Q + offs_q
    t_ok, p_ok, n_ok = t < L, offs_p < P, offs_n < N
    a = tl.load(a_ptr + b * s_ab + t * s_al + hh * s_ah, mask=t_ok, other=0.0).to(tl.float32)
    cs = tl.cumsum(a, axis=0)  # (Q,)
    causal = offs_q[:, None] >= offs_q[None, :]
    inter = tl.exp(cs)
    if HAS_SEQ:
        doc = tl.load(seq_ptr + b * s_qb + t * s_ql, mask=t_ok, other=-1)
        causal = causal & (doc[:, None] == doc[None, :])
        before = tl.load(seq_ptr + b * s_qb + (c * Q - 1) * s_ql, mask=c > 0, other=-1)
        first = tl.load(seq_ptr + b * s_qb)
        entering = tl.where(c > 0, before, first)  # the document of the state entering the chunk
        inter = tl.where(doc == entering, inter, 0.0)
    decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))  # (Q, Q)
    Ct = _load_chunk(C_ptr + b * s_Cb + (hh // heads_per_C) * s_Cg, t, t_ok, offs_n, n_ok, s_Cl)  # (Q, BN)
    Bt = _load_chunk(B_ptr + b * s_Bb + (hh // heads_per_B) * s_Bg, t, t_ok, offs_n, n_ok, s_Bl)  # (Q, BN)
    x = _load_chunk(x_ptr + b * s_xb + hh * s_xh, t, t_ok, offs_p, p_ok, s_xl)  # (Q, BPP)
    M = tl.dot(Ct, tl.trans(Bt)).to(tl.float32) * decay  # (Q, Q)
    y = tl.dot(M.to(x.dtype), x).to(tl.float32)  # (Q, BPP)
    Hc = tl.load(states_ptr + (pid_bh * nc + c) * P * N + offs_p[:, None] * N + offs_n[None, :],
                 mask=p_ok[:, None] & n_ok[None, :], other=0.0)  # (BPP, BN) float32
    y += inter[:, None] * tl.dot(Ct.to(tl.float32), tl.trans(Hc))  # (Q, BN) @ (BN, BPP)
    if HAS_D:
        y += tl.load(D_ptr + hh).to(tl.float32) * x.to(tl.float32)
    tl.store(y_ptr + b * s_yb + hh * s_yh + t[:, None] * s_yl + offs_p[None, :], y.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & p_ok[None, :])


@triton.jit
def _bwd_chunk(
    x_ptr, a_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, dy_ptr, states_ptr, dstates_ptr,
    dx_ptr, dB_ptr, dC_ptr, dg_ptr, dD_ptr,
    L, h, nc, P, N, heads_per_B, heads_per_C,
    s_xb, s_xl, s_xh, s_ab, s_al, s_ah, s_Bb, s_Bl, s_Bg, s_Cb, s_Cl, s_Cg, s_qb, s_ql, s_yb, s_yl, s_yh,
    Q: tl.constexpr, BPP: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    c, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // h, pid_bh % h
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BPP)
    offs_n = tl.arange(0, BN)
    t = c * Q + offs_q
    t_ok, p_ok, n_ok = t < L, offs_p < P, offs_n < N
    a = tl.load(a_ptr + b * s_ab + t * s_al + hh * s_ah, mask=t_ok, other=0.0).to(tl.float32)
    cs = tl.cumsum(a, axis=0)
    last = tl.sum(a, axis=0)
    causal = offs_q[:, None] >= offs_q[None, :]
    inter = tl.exp(cs)  # decay of the entering state to token t
    to_end = tl.exp(last - cs)  # decay of token s to the chunk's end
    if HAS_SEQ:
        doc = tl.load(seq_ptr + b * s_qb + t * s_ql, mask=t_ok, other=-1)
        causal = causal & (doc[:, None] == doc[None, :])
        before = tl.load(seq_ptr + b * s_qb + (c * Q - 1) * s_ql, mask=c > 0, other=-1)
        entering = tl.where(c > 0, before, tl.load(seq_ptr + b * s_qb))
        inter = tl.where(doc == entering, inter, 0.0)
        end_doc = tl.max(tl.where(t_ok, doc, -1), axis=0)
        to_end = tl.where(doc == end_doc, to_end, 0.0)
    decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))  # (Q, Q)
    Ct = _load_chunk(C_ptr + b * s_Cb + (hh // heads_per_C) * s_Cg, t, t_ok, offs_n, n_ok, s_Cl)  # (Q, BN)
    Bt = _load_chunk(B_ptr + b * s_Bb + (hh // heads_per_B) * s_Bg, t, t_ok, offs_n, n_ok, s_Bl)  # (Q, BN)
    x = _load_chunk(x_ptr + b * s_xb + hh * s_xh, t, t_ok, offs_p, p_ok, s_xl)  # (Q, BPP)
    dy = _load_chunk(dy_ptr + b * s_yb + hh * s_yh, t, t_ok, offs_p, p_ok, s_yl).to(x.dtype)  # (Q, BPP)
    st_off = (pid_bh * nc + c) * P * N + offs_p[:, None] * N + offs_n[None, :]
    st_ok = p_ok[:, None] & n_ok[None, :]
    Hc = tl.load(states_ptr + st_off, mask=st_ok, other=0.0)  # (BPP, BN) state entering the chunk
    dHe = tl.load(dstates_ptr + st_off, mask=st_ok, other=0.0)  # (BPP, BN) grad of the state at its end

    M = tl.dot(Ct, tl.trans(Bt)).to(tl.float32) * decay  # (Q, Q): y_intra = M x
    dM = tl.dot(dy, tl.trans(x)).to(tl.float32) * decay  # (Q, Q): grad of (C B^T) inside the mask
    dx = tl.dot(tl.trans(M).to(dy.dtype), dy).to(tl.float32)  # (Q, BPP)
    dx += to_end[:, None] * tl.dot(Bt.to(tl.float32), tl.trans(dHe))  # (Q, BN) @ (BN, BPP)
    dC = tl.dot(dM.to(Bt.dtype), Bt).to(tl.float32)  # (Q, BN)
    dC += inter[:, None] * tl.dot(dy.to(tl.float32), Hc)  # (Q, BPP) @ (BPP, BN)
    dB = tl.dot(tl.trans(dM).to(Ct.dtype), Ct).to(tl.float32)  # (Q, BN)
    dB += to_end[:, None] * tl.dot(x.to(tl.float32), dHe)  # (Q, BPP) @ (BPP, BN)
    if HAS_D:
        dx += tl.load(D_ptr + hh).to(tl.float32) * dy.to(tl.float32)
        tl.store(dD_ptr + pid_bh * nc + c, tl.sum(tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=1), axis=0))
    dg = tl.sum(Ct.to(tl.float32) * dC, axis=1) - tl.sum(Bt.to(tl.float32) * dB, axis=1)  # (Q,)
    tl.store(dx_ptr + b * s_yb + hh * s_yh + t[:, None] * s_yl + offs_p[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=t_ok[:, None] & p_ok[None, :])
    bn_off = ((b * L + t[:, None]) * h + hh) * N + offs_n[None, :]  # dB / dC per head: (b, L, h, N) contiguous
    tn_ok = t_ok[:, None] & n_ok[None, :]
    tl.store(dB_ptr + bn_off, dB, mask=tn_ok)
    tl.store(dC_ptr + bn_off, dC, mask=tn_ok)
    tl.store(dg_ptr + (b * L + t) * h + hh, dg, mask=t_ok)


def _group_sum(per_head: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, L, h, n) per-head gradients -> (b, L, groups, n): heads sharing a group add up."""
    b, L, h, n = per_head.shape
    return per_head.view(b, L, groups, h // groups, n).sum(3)


# Tile sizes: the kernels' chunk length is an implementation choice (the result does not depend on it).
CONFIG = {"chunk": 64, "scan_block": 1024, "num_warps": 4}


class _SSDFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log_a, B, C, D, initial_state, seq_idx):  # type: ignore[override]
        b, L, h, P = x.shape
        gB, gC, N = B.shape[2], C.shape[2], B.shape[3]
        Q, warps = CONFIG["chunk"], CONFIG["num_warps"]
        nc = triton.cdiv(L, Q)
        BPP, BN = _pow2(P), _pow2(N)
        dev = x.device
        states = torch.empty(b, h, nc, P, N, device=dev, dtype=torch.float32)
        keep = torch.empty(b, h, nc, device=dev, dtype=torch.float32)
        final = torch.empty(b, h, P, N, device=dev, dtype=torch.float32)
        y = torch.empty_like(x)
        seq, s_seq = _seq_args(seq_idx, log_a)
        _chunk_states[(nc, b * h)](
            x, log_a, B, seq, states, keep, L, h, nc, P, N, h // gB,
            *x.stride()[:3], *log_a.stride(), *B.stride()[:3], *s_seq,
            Q=Q, BPP=BPP, BN=BN, TO_END=True, HAS_SEQ=seq_idx is not None, num_warps=warps,
        )
        init = initial_state.contiguous().float() if initial_state is not None else final  # dummy when absent
        blk = CONFIG["scan_block"]
        _scan_states[(b * h, triton.cdiv(P * N, blk))](
            states, keep, init, final, nc, P * N, BLOCK=blk, REVERSE=False, HAS_INIT=initial_state is not None,
        )
        _fwd_output[(nc, b * h)](
            x, log_a, B, C, D if D is not None else log_a, seq, states, y, L, h, nc, P, N, h // gB, h // gC,
            *x.stride()[:3], *log_a.stride(), *B.stride()[:3], *C.stride()[:3], *s_seq, *y.stride()[:3],
            Q=Q, BPP=BPP, BN=BN, HAS_D=D is not None, HAS_SEQ=seq_idx is not None, num_warps=warps,
        )
        ctx.save_for_backward(x, log_a, B, C, D, seq_idx, states, keep, final)
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):  # type: ignore[override]
        x, log_a, B, C, D, seq_idx, states, keep, final = ctx.saved_tensors
        b, L, h, P = x.shape
        gB, gC, N = B.shape[2], C.shape[2], B.shape[3]
        Q, warps = CONFIG["chunk"], CONFIG["num_warps"]
        nc = triton.cdiv(L, Q)
        BPP, BN = _pow2(P), _pow2(N)
        dev = x.device
        dy = dy.contiguous() if dy is not None else torch.zeros_like(x)
        seq, s_seq = _seq_args(seq_idx, log_a)
        dstates = torch.empty_like(states)
        _chunk_states[(nc, b * h)](
            dy, log_a, C, seq, dstates, keep, L, h, nc, P, N, h // gC,
            *dy.stride()[:3], *log_a.stride(), *C.stride()[:3], *s_seq,
            Q=Q, BPP=BPP, BN=BN, TO_END=False, HAS_SEQ=seq_idx is not None, num_warps=warps,
        )
        dinit = torch.empty(b, h, P, N, device=dev, dtype=torch.float32)
        dfin = dfinal.contiguous().float() if dfinal is not None else dinit  # dummy when absent
        blk = CONFIG["scan_block"]
        _scan_states[(b * h, triton.cdiv(P * N, blk))](
            dstates, keep, dfin, dinit, nc, P * N, BLOCK=blk, REVERSE=True, HAS_INIT=dfinal is not None,
        )
        dx = torch.empty_like(x)
        dB_h = torch.empty(b, L, h, N, device=dev, dtype=torch.float32)
        dC_h = torch.empty(b, L, h, N, device=dev, dtype=torch.float32)
        dg = torch.empty(b, L, h, device=dev, dtype=torch.float32)
        dD_parts = torch.empty(b * h * nc if D is not None else 1, device=dev, dtype=torch.float32)
        _bwd_chunk[(nc, b * h)](
            x, log_a, B, C, D if D is not None else log_a, seq, dy, states, dstates, dx, dB_h, dC_h, dg, dD_parts,
            L, h, nc, P, N, h // gB, h // gC,
            *x.stride()[:3], *log_a.stride(), *B.stride()[:3], *C.stride()[:3], *s_seq, *dy.stride()[:3],
            Q=Q, BPP=BPP, BN=BN, HAS_D=D is not None, HAS_SEQ=seq_idx is not None, num_warps=warps,
        )
        if dfinal is not None:  # the final state carries exp(g_last - g_s): its decay term belongs to the last token
            dg[:, -1] += (dfinal.float() * final).sum((-1, -2))
        dlog_a = dg.flip(1).cumsum(1).flip(1)  # d log_a_k = sum_{t >= k} dg_t
        if seq_idx is not None:  # ... but only over k's own document
            dlog_a = dlog_a - _doc_start_correction(dg, seq_idx)
        dD = dD_parts.view(b, h, nc).sum((0, 2)).to(D.dtype) if D is not None else None
        dinit_out = None if ctx.init_dtype is None else dinit.to(ctx.init_dtype)
        return (dx, dlog_a.to(log_a.dtype), _group_sum(dB_h, gB).to(B.dtype), _group_sum(dC_h, gC).to(C.dtype),
                dD, dinit_out, None)


def _seq_args(seq_idx: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The document-id pointer and its strides (a dummy pointer and zero strides without ``seq_idx``)."""
    if seq_idx is None:
        return dummy, (0, 0)
    return seq_idx, (seq_idx.stride(0), seq_idx.stride(1))


def _doc_start_correction(dg: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """What the global reverse cumsum adds to ``d log_a`` across later documents: ``(b, L, h)``.

    Within a document, ``d log_a_k = sum_{t >= k, same document} dg_t``; the plain reverse cumsum
    over the sequence also sums the later documents' ``dg`` (whose terms never reach back across
    a reset). Subtract, for each token, the total of every later document.
    """
    total = dg.flip(1).cumsum(1).flip(1)  # (b, L, h): sum over t >= k
    last_of_doc = torch.ones_like(seq_idx, dtype=torch.bool)
    last_of_doc[:, :-1] = seq_idx[:, 1:] != seq_idx[:, :-1]
    # the sum over t beyond the end of k's document = total at the next document's first token
    after = torch.zeros_like(total)
    after[:, :-1] = torch.where(last_of_doc[:, :-1, None], total[:, 1:], torch.zeros_like(total[:, 1:]))
    # propagate "sum beyond my document" from each document's last token back to its other tokens
    idx = torch.arange(seq_idx.shape[1], device=seq_idx.device).expand_as(seq_idx)
    end_pos = torch.where(last_of_doc, idx, torch.full_like(idx, seq_idx.shape[1]))
    end_of = end_pos.flip(1).cummin(1).values.flip(1)  # (b, L): position of the last token of k's document
    return torch.gather(after, 1, end_of[..., None].expand_as(after))


@torch.compiler.disable  # an opaque call inside compiled blocks (verify/compiled.py)
def ssd_fused(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decay-form SSD on the fused kernels; differentiable in every tensor argument but ``seq_idx``.

    x (b, L, h, p), log_a (b, L, h) <= 0, B (b, L, gB, n), C (b, L, gC, n), D (h,),
    initial_state (b, h, p, n), seq_idx (b, L) non-decreasing document ids -> y (b, L, h, p) in
    x's dtype, final state (b, h, p, n) in float32. ``B`` and ``C`` are cast to x's dtype (bf16
    or fp32 dots, float32 accumulation).
    """
    if D is not None and D.ndim != 1:
        raise ValueError("ssd_fused needs D per head (h,)")
    x = x.contiguous()
    B = B.to(x.dtype).contiguous()
    C = C.to(x.dtype).contiguous()
    log_a = log_a.float().contiguous()
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()
    del chunk_size  # the reference's chunk length; the kernels use their own (CONFIG), the result is the same
    parts = launch_limits.batch_slices(x.shape[0], x.shape[2])
    if len(parts) == 1:
        return _SSDFused.apply(x, log_a, B, C, D, initial_state, seq_idx)
    outs = [  # rows are independent: slices keep every launch grid inside CUDA's limit
        _SSDFused.apply(x[r], log_a[r], B[r], C[r], D, None if initial_state is None else initial_state[r],
                        None if seq_idx is None else seq_idx[r])
        for r in parts
    ]
    return torch.cat([y for y, _ in outs]), torch.cat([f for _, f in outs])
