"""Stage-3 distillation loss fused with the LM heads, chunk by chunk: no ``(tokens, vocab)`` tensor survives.

``loss = kl_weight * T^2 * mean_t KL(softmax(z_t / T) || softmax(s_t / T)) + ce_weight * mean_t CE(s_t, y_t)``
with ``s = h_s W_s^T (+ b_s)`` the student's logits and ``z = h_t W_t^T (+ b_t)`` the teacher's
(Hinton et al. 2015 for ``T^2``; MOHAWK stage 3, Bick et al. 2024, arXiv 2408.10189). The
logits exist one chunk of tokens at a time; the gradients for ``h_s``, ``W_s`` and ``b_s`` are
computed in the same pass (as Liger-Kernel's fused linear cross-entropy does, Hsu et al. 2024,
arXiv 2410.10989) and handed to autograd, so memory is ``O(chunk x vocab)`` instead of several
``(tokens x vocab)`` float32 tensors. Plain torch: every device; the matmuls follow autocast.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["fused_distill_loss"]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_terms(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, has: torch.Tensor, n_ce: torch.Tensor,
                 T: float, kl_coef: float, ce_weight: float, out_dtype: torch.dtype):
    """One chunk's KL sum, CE sum and ``d loss / d s``: s, t (c, V) logits, y (c,) targets, has (c,) bool.

    ``g = kl_coef (softmax(s/T) - softmax(t/T)) + ce_weight / n_ce (softmax(s) - onehot(y))`` (rows
    with a target), returned in ``out_dtype`` (the dtype its two matmuls run in). Element-wise and
    row reductions only: on CUDA this function runs compiled (:func:`_terms_fn`), one fused pass
    instead of a dozen over ``(c, V)`` float32 tensors (opt-in until measured faster).
    """
    acc = _acc_dtype(s)
    log_pt = F.log_softmax(t.to(acc) / T, dim=-1)  # (c, V)
    log_ps = F.log_softmax(s.to(acc) / T, dim=-1)
    pt = log_pt.exp()
    kl = (pt * (log_pt - log_ps)).sum()
    g = (log_ps.exp() - pt) * kl_coef  # d(kl_weight T^2 mean KL) / ds
    ce = kl.new_zeros(())
    if ce_weight:
        y = y.clamp_min(0)
        log_p = F.log_softmax(s.to(acc), dim=-1)
        ce = -(log_p.gather(1, y[:, None])[:, 0] * has).sum()
        d_ce = log_p.exp()
        d_ce[torch.arange(d_ce.shape[0], device=d_ce.device), y] -= 1.0
        g = g + d_ce * (has[:, None].to(acc) * (ce_weight / n_ce))
    return kl, ce, g.to(out_dtype)


@functools.cache
def _compiled_terms():
    """:func:`_chunk_terms` compiled with inductor (built once per process)."""
    return torch.compile(_chunk_terms, dynamic=False)


def _terms_fn(device: torch.device):
    """:func:`_chunk_terms`, compiled on CUDA with ``SURGERY_NEW_GPU_KERNELS=1``
    (:func:`surgery.ops.new_gpu_kernels`), eager elsewhere."""
    from . import new_gpu_kernels

    return _compiled_terms() if device.type == "cuda" and new_gpu_kernels() else _chunk_terms


def _matmul_dtype(h: torch.Tensor) -> torch.dtype:
    """What ``g``'s matmuls run in: the autocast dtype where autocast is on, else the accumulation dtype."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return _acc_dtype(h)


class _FusedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, W_s, b_s, h_t, W_t, b_t, targets, temperature, kl_weight, ce_weight, chunk):  # type: ignore[override]
        n, acc = h_s.shape[0], _acc_dtype(h_s)
        grad_h = torch.zeros_like(h_s, dtype=acc) if ctx.needs_input_grad[0] else None
        grad_W = torch.zeros_like(W_s, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(b_s, dtype=acc) if b_s is not None and ctx.needs_input_grad[2] else None
        kl_sum = h_s.new_zeros((), dtype=acc)
        ce_sum = h_s.new_zeros((), dtype=acc)
        has_target = targets >= 0  # (N,)
        n_ce = has_target.sum().clamp_min(1).to(acc)  # on the device: no host read
        T = temperature
        terms, out_dtype = _terms_fn(h_s.device), _matmul_dtype(h_s)
        with torch.no_grad():
            for start in range(0, n, chunk):
                sl = slice(start, min(start + chunk, n))
                kl, ce, g = terms(F.linear(h_s[sl], W_s, b_s), F.linear(h_t[sl], W_t, b_t), targets[sl], has_target[sl],
                                  n_ce, T, kl_weight * T / n, ce_weight, out_dtype)  # g (c, V)
                kl_sum += kl
                ce_sum += ce
                if grad_h is not None:
                    grad_h[sl] = (g @ W_s).to(acc)  # (c, V) @ (V, d)
                if grad_W is not None:
                    grad_W += (g.t() @ h_s[sl]).to(acc)  # (V, c) @ (c, d)
                if grad_b is not None:
                    grad_b += g.sum(0, dtype=acc)
        ctx.save_for_backward(grad_h, grad_W, grad_b)
        ctx.dtypes = (h_s.dtype, W_s.dtype, None if b_s is None else b_s.dtype)
        kl = kl_sum / n
        ce = ce_sum / n_ce
        return kl_weight * T * T * kl + ce_weight * ce, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):  # type: ignore[override]
        grad_h, grad_W, grad_b = ctx.saved_tensors
        h_dt, W_dt, b_dt = ctx.dtypes
        out_h = None if grad_h is None else (grad_h * grad_loss).to(h_dt)
        out_W = None if grad_W is None else (grad_W * grad_loss).to(W_dt)
        out_b = None if grad_b is None else (grad_b * grad_loss).to(b_dt)
        return out_h, out_W, out_b, None, None, None, None, None, None, None, None


def fused_distill_loss(
    h_s: torch.Tensor,
    W_s: torch.Tensor,
    b_s: torch.Tensor | None,
    h_t: torch.Tensor,
    W_t: torch.Tensor,
    b_t: torch.Tensor | None,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, mean KL, mean CE)`` over ``N`` tokens; differentiable in ``h_s``, ``W_s``, ``b_s``.

    h_s (N, d) student final hidden states, W_s (V, d), b_s (V,); h_t (N, d') / W_t (V, d') /
    b_t the teacher's (no gradient); targets (N,) next-token ids, -1 where there is none (needed
    only with ``ce_weight``). The CE mean is over tokens with a target.
    """
    if targets is None:
        if ce_weight:
            raise ValueError("ce_weight needs targets")
        targets = torch.full((h_s.shape[0],), -1, dtype=torch.long, device=h_s.device)
    return _FusedDistill.apply(h_s, W_s, b_s, h_t.detach(), W_t.detach(), None if b_t is None else b_t.detach(),
                               targets, float(temperature), float(kl_weight), float(ce_weight), int(chunk))
