"""Depthwise causal convolution over time, forward and backward, in Triton.

The short convolution in front of every SSM mixer's ``x``, ``B`` and ``C`` (Mamba, Gu & Dao 2023,
arXiv 2312.00752, sec. 3.4; Mamba-2, Dao & Gu 2024, arXiv 2405.21060), per channel ``c``::

    y_t[c] = bias[c] + sum_j w[c, j] x_{t - (K-1) + j}[c]        (x_s = 0 for s < 0)

in the ``(b, L, ch)`` layout the projections produce, so no transpose is copied. One program per
``(batch x time block, channel block)``; each reads its time block and the ``K - 1`` tokens before
it. The backward computes ``dx_s = sum_j w[c, j] dy_{s + (K-1) - j}`` and, per program, partial
sums of ``dw[c, j] = sum_t dy_t[c] x_{t - (K-1) + j}[c]`` and ``dbias``, which torch adds up
(no atomics: the result does not depend on the launch order). Float32 accumulation; ``y`` and
``dx`` in ``x``'s dtype, ``dw`` and ``dbias`` in the parameters' dtypes.

Only :mod:`surgery.ops` imports this module, for CUDA tensors (or under ``TRITON_INTERPRET=1``
in development); the plain-torch reference is ``F.conv1d`` (the other branch of
:func:`surgery.mixers._common.causal_conv`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["causal_conv1d_fused"]

# Tile sizes (time x channels); the result does not depend on them.
CONFIG = {"block_t": 64, "block_c": 64, "num_warps": 4}


@triton.jit
def _conv_fwd(
    x_ptr, w_ptr, bias_ptr, y_ptr, L, CH, n_tb,
    s_xb, s_xt, s_yb, s_yt,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid, pid_c = tl.program_id(0), tl.program_id(1)
    b, tb = pid // n_tb, pid % n_tb
    t = tb * BT + tl.arange(0, BT)  # (BT,) output times
    c = pid_c * BC + tl.arange(0, BC)  # (BC,) channels
    c_ok = c < CH
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(K):
        src = t - (K - 1) + j
        ok = (src >= 0) & (t < L)
        xv = tl.load(x_ptr + b * s_xb + src[:, None] * s_xt + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
        wv = tl.load(w_ptr + c * K + j, mask=c_ok, other=0.0)
        acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + b * s_yb + t[:, None] * s_yt + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & c_ok[None, :])


@triton.jit
def _conv_bwd(
    x_ptr, w_ptr, dy_ptr, dx_ptr, dw_part_ptr, db_part_ptr, L, CH, n_tb,
    s_xb, s_xt, s_dyb, s_dyt, s_dxb, s_dxt,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    pid, pid_c = tl.program_id(0), tl.program_id(1)
    b, tb = pid // n_tb, pid % n_tb
    s = tb * BT + tl.arange(0, BT)  # (BT,) times of this block (inputs for dx, outputs for dw)
    c = pid_c * BC + tl.arange(0, BC)
    c_ok = c < CH
    s_ok = s < L
    dy_own = tl.load(dy_ptr + b * s_dyb + s[:, None] * s_dyt + c[None, :], mask=s_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)  # (BT, BC)
    dx = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(K):
        wv = tl.load(w_ptr + c * K + j, mask=c_ok, other=0.0).to(tl.float32)  # (BC,)
        # dx_s += w_j dy_{s + K-1-j}
        dst = s + (K - 1) - j
        dyv = tl.load(dy_ptr + b * s_dyb + dst[:, None] * s_dyt + c[None, :],
                      mask=(dst < L)[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        dx += dyv * wv[None, :]
        # dw_j += sum_t dy_t x_{t - (K-1) + j}, t over this block
        src = s - (K - 1) + j
        xv = tl.load(x_ptr + b * s_xb + src[:, None] * s_xt + c[None, :],
                     mask=((src >= 0) & s_ok)[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        tl.store(dw_part_ptr + (pid * K + j) * CH + c, tl.sum(dy_own * xv, axis=0), mask=c_ok)
    tl.store(db_part_ptr + pid * CH + c, tl.sum(dy_own, axis=0), mask=c_ok)
    tl.store(dx_ptr + b * s_dxb + s[:, None] * s_dxt + c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=s_ok[:, None] & c_ok[None, :])


def _grid(b: int, L: int, ch: int) -> tuple[int, int, int]:
    """``(programs on axis 0, time blocks per row, channel blocks)``."""
    n_tb = triton.cdiv(L, CONFIG["block_t"])
    return b * n_tb, n_tb, triton.cdiv(ch, CONFIG["block_c"])


class _CausalConvFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        b, L, ch = x.shape
        K = weight.shape[-1]
        rows, n_tb, n_cb = _grid(b, L, ch)
        y = torch.empty_like(x)
        _conv_fwd[(rows, n_cb)](
            x, weight, bias if bias is not None else weight, y, L, ch, n_tb, x.stride(0), x.stride(1),
            y.stride(0), y.stride(1), K=K, BT=CONFIG["block_t"], BC=CONFIG["block_c"], HAS_BIAS=bias is not None,
            num_warps=CONFIG["num_warps"],
        )
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        b, L, ch = x.shape
        K = weight.shape[-1]
        dy = dy.contiguous()
        rows, n_tb, n_cb = _grid(b, L, ch)
        dx = torch.empty_like(x)
        dw_part = torch.empty(rows, K, ch, device=x.device, dtype=torch.float32)
        db_part = torch.empty(rows, ch, device=x.device, dtype=torch.float32)
        _conv_bwd[(rows, n_cb)](
            x, weight, dy, dx, dw_part, db_part, L, ch, n_tb, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            dx.stride(0), dx.stride(1), K=K, BT=CONFIG["block_t"], BC=CONFIG["block_c"], num_warps=CONFIG["num_warps"],
        )
        dw = dw_part.sum(0).t().to(weight.dtype)  # (ch, K)
        db = db_part.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx, dw, db


@torch.compiler.disable  # an opaque call inside compiled blocks (verify/compiled.py)
def causal_conv1d_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (b, L, ch), weight (ch, K), bias (ch,) or None -> y (b, L, ch) in x's dtype (zeros before the start).

    Differentiable in all three. The channel axis must be the contiguous one (it is made so).
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _CausalConvFused.apply(x, weight.contiguous(), bias)
