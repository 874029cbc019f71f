"""Pieces shared by the mixers: padding from the attention mask, the causal short conv, inits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..mixer_options import check_divides  # noqa: F401 - re-exported for the mixers

if TYPE_CHECKING:
    from .base import AttentionWeights

# silu(GATE_OPEN_BIAS) ~= 1: the z_bias that opens a silu gate whose z projection is zero.
GATE_OPEN_BIAS = 1.2785


def token_validity(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Which of the ``length`` current tokens are real (not padding): ``(b, L)`` bool, or None (all real).

    Accepts what reaches an attention module in transformers 5: None, a 2-D padding mask
    ``(b, kv)`` (flash-attention; 1 = real), or a 4-D ``(b, 1|h, q, kv)`` mask, bool (True =
    attend) or additive float (0 = attend, dtype min = masked). The current tokens are always the
    last ``q`` key columns (full and sliding-window KV caches alike; ``SSMCacheLayer`` sizes masks
    like a full layer), so token ``i``'s validity is the mask's diagonal entry
    ``mask[:, 0, i, kv - q + i]``: causal and sliding-window masks always let a token see itself,
    and only the padding mask removes it. transformers 5.23 never un-masks fully masked rows
    (``allow_torch_fix`` is a no-op), so a padding token's diagonal stays masked.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"SSM mixers need a tensor attention mask, got {type(attention_mask).__name__}; "
            "use attn_implementation 'eager' or 'sdpa' (or 'flash_attention_2')"
        )
    if attention_mask.ndim == 2:  # (b, kv) padding mask
        return attention_mask[:, -length:].bool()
    if attention_mask.ndim != 4:
        raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)}: expected 2-D or 4-D")
    q, kv = attention_mask.shape[-2:]
    if q < length or kv < length:
        raise ValueError(f"attention mask {tuple(attention_mask.shape)} is smaller than the {length} current tokens")
    block = attention_mask[:, 0, -length:, kv - length :]  # (b, L, L): current queries x current keys
    diag = torch.diagonal(block, dim1=-2, dim2=-1)  # (b, L)
    if diag.dtype == torch.bool:
        return diag
    return diag > torch.finfo(diag.dtype).min / 2


def causal_conv(
    x: torch.Tensor, conv: nn.Conv1d | None, history: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal conv over time, continuing from ``history``.

    x (b, L, ch), history (b, ch, k-1) or None (zeros) -> y (b, L, ch), new history (b, ch, k-1)
    (the last ``k - 1`` inputs, for the next call). Without a conv: ``(x, None)``.
    """
    if conv is None:
        return x, None
    k = conv.kernel_size[0]
    xt = x.transpose(1, 2)  # (b, ch, L)
    if history is not None and x.shape[1] == 1:  # decoding: a dot product over the window (fuses when compiled)
        full = torch.cat([history.to(xt.dtype), xt], dim=-1)  # (b, ch, k)
        acc = torch.promote_types(xt.dtype, torch.float32)  # half inputs accumulate in float32, like the conv
        y = (full.to(acc) * conv.weight[:, 0].to(acc)).sum(-1)  # (b, ch)
        if conv.bias is not None:
            y = y + conv.bias.to(acc)
        return y.to(x.dtype)[:, None], full[:, :, 1:]
    if history is None and ops.conv_kernel_applies(x):  # training / a first prefill on CUDA: one fused kernel
        from ..ops.conv_fused import causal_conv1d_fused

        y = causal_conv1d_fused(x, conv.weight[:, 0], conv.bias)  # (b, L, ch)
        kept = min(x.shape[1], k - 1)
        window = F.pad(x[:, x.shape[1] - kept :].transpose(1, 2), (k - 1 - kept, 0))  # (b, ch, k-1)
        return y, window
    if history is None:
        history = xt.new_zeros(xt.shape[0], xt.shape[1], k - 1)
    full = torch.cat([history.to(xt.dtype), xt], dim=-1)  # (b, ch, k-1+L)
    y = F.conv1d(full, conv.weight, conv.bias, groups=conv.groups)  # (b, ch, L)
    return y.transpose(1, 2), full[:, :, full.shape[-1] - (k - 1) :]


@dataclass(frozen=True)
class FusedProjection:
    """Projections of one input stacked into one matmul (decoding: one kernel instead of several).

    ``weight (sum(sizes), d)`` holds each projection's rows in turn, ``bias`` their biases (zeros
    for a projection without one; None when none has one). A copy of the weights, taken once: the
    static decoder (:mod:`surgery.graph_decode`) builds it for the cache it owns.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: tuple[int, ...]

    @classmethod
    @torch.no_grad()
    def of(cls, linears: Sequence[nn.Linear]) -> FusedProjection:
        weight = torch.cat([lin.weight for lin in linears])  # (sum(out), d)
        bias = None
        if any(lin.bias is not None for lin in linears):
            bias = torch.cat([lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias for lin in linears])
        return cls(weight, bias, tuple(lin.out_features for lin in linears))


def project(u: torch.Tensor, linears: Sequence[nn.Linear], fused: FusedProjection | None) -> list[torch.Tensor]:
    """``[lin(u) for lin in linears]``, computed as one matmul when ``fused`` (built from the same linears) is given."""
    if fused is None:
        return [lin(u) for lin in linears]
    return list(F.linear(u, fused.weight, fused.bias).split(fused.sizes, dim=-1))


def make_conv(channels: int, kernel: int, bias: bool) -> nn.Conv1d | None:
    """A depthwise conv (applied causally by :func:`causal_conv`); None when ``kernel == 0``."""
    if kernel == 0 or channels == 0:
        return None
    return nn.Conv1d(channels, channels, kernel, groups=channels, bias=bias)


@torch.no_grad()
def identity_conv_(conv: nn.Conv1d | None) -> None:
    """Make a causal depthwise conv the identity (weight 1 on the current token, bias 0)."""
    if conv is None:
        return
    conv.weight.zero_()
    conv.weight[:, :, -1] = 1.0
    if conv.bias is not None:
        conv.bias.zero_()


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """``x`` with ``softplus(x) == y`` (y > 0)."""
    return y + torch.log(-torch.expm1(-y))


def heads_str(n: int) -> str:
    """``h=4`` for transfer records."""
    return f"h={n}"


def check_positive(owner: str, **values: int | None) -> None:
    """Raise ``ValueError`` naming the first value that is missing or not positive."""
    for name, value in values.items():
        if value is None:
            raise ValueError(f"{owner}: {name} is not set; resolve the params against the teacher (resolve_params) or set it")
        if value <= 0:
            raise ValueError(f"{owner}: {name} must be positive, got {value}")


def log_uniform_(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Fill with ``exp(U(log low, log high))``."""
    with torch.no_grad():
        return t.uniform_(math.log(low), math.log(high)).exp_()


def head_sources(n_target: int, n_heads: int, n_kv_heads: int, kind: str) -> tuple[list[int], str] | None:
    """Teacher heads feeding ``n_target`` mixer heads from a per-query (``"q"``) or per-KV (``"kv"``) tensor.

    Returns ``(source head of each target head, record text)`` or None when the counts do not fit:
    a per-KV tensor fits ``n_kv_heads`` targets (copied) or ``n_heads`` targets (each query head
    reads its KV group: GQA expansion); a per-query tensor fits ``n_heads`` targets.
    """
    group = n_heads // n_kv_heads
    if kind == "q":
        return (list(range(n_heads)), f"[h={n_heads}]") if n_target == n_heads else None
    if n_target == n_kv_heads:
        return list(range(n_kv_heads)), f"[h={n_kv_heads}]"
    if n_target == n_heads:
        return [h // group for h in range(n_heads)], f"[h={n_kv_heads}] repeated x{group} per group"
    return None


@torch.no_grad()
def copy_heads(dst: torch.Tensor, src: torch.Tensor, sources: list[int]) -> None:
    """``dst[i] = src[sources[i]]`` for head-major ``dst (H, ...)`` / ``src (Hs, ...)`` (dst may be a view)."""
    index = torch.tensor(sources, device=src.device)
    dst.copy_(src.index_select(0, index).to(dst.dtype))


@torch.no_grad()
def transfer_heads(
    owner: str,
    flag: str,
    proj: nn.Linear,
    count: tuple[str, int],
    dim: tuple[str, int],
    src: torch.Tensor,
    src_bias: torch.Tensor | None,
    teacher: tuple[int, int, int],
    kind: str,
    src_name: str,
) -> tuple[str, str]:
    """Copy teacher heads ``src (Hs, head_dim, d)`` into ``proj`` viewed as ``(count, dim, d)``.

    ``teacher = (n_heads, n_kv_heads, head_dim)``; ``kind`` is ``"q"`` (per query head) or
    ``"kv"`` (per KV head; expanded per group when ``count`` is the query head count). Raises
    ``ValueError`` naming the mixer parameter that does not fit. Returns a transfer record entry.
    """
    n_heads, n_kv_heads, head_dim = teacher
    fit = head_sources(count[1], n_heads, n_kv_heads, kind)
    if fit is None:
        need = f"{n_heads}" if kind == "q" else f"{n_kv_heads} or {n_heads}"
        raise ValueError(f"{owner}: init {flag} needs {count[0]} = {need} (the teacher's heads), got {count[1]}")
    if dim[1] != head_dim:
        raise ValueError(f"{owner}: init {flag} needs {dim[0]} == the teacher's head_dim ({head_dim}), got {dim[1]}")
    sources, text = fit
    copy_heads(proj.weight.view(count[1], dim[1], -1), src, sources)
    note = ""
    if src_bias is not None:
        if proj.bias is not None:
            copy_heads(proj.bias.view(count[1], dim[1]), src_bias, sources)
        else:
            note = " (teacher bias dropped: bias=False)"
    return f"{proj_name(proj)}[h={count[1]}]", f"{src_name}{text}{note}"


def proj_name(module: nn.Module) -> str:
    """The attribute name a projection was registered under (set by :func:`name_modules`)."""
    return getattr(module, "_surgery_name", type(module).__name__)


def name_modules(owner: nn.Module) -> None:
    """Tag each direct child with its attribute name (for transfer records)."""
    for name, child in owner.named_children():
        child._surgery_name = name  # type: ignore[attr-defined]


@torch.no_grad()
def transfer_out(
    owner: str, out_proj: nn.Linear, n_heads: int, head_dim: int, o: torch.Tensor, o_bias: torch.Tensor | None
) -> tuple[str, str]:
    """Copy ``o (d, n_heads, head_dim)`` into ``out_proj`` (d, n_heads * head_dim); returns a record entry."""
    d, tn, tp = o.shape
    if n_heads != tn or head_dim != tp:
        raise ValueError(
            f"{owner}: init o_to_out needs heads == {tn} and head_dim == {tp} (the teacher's), got {n_heads} and {head_dim}"
        )
    out_proj.weight.view(d, n_heads, head_dim).copy_(o.to(out_proj.weight.dtype))
    note = ""
    if o_bias is not None:
        if out_proj.bias is not None:
            out_proj.bias.copy_(o_bias.to(out_proj.bias.dtype))
        else:
            note = " (teacher bias dropped: bias=False)"
    return "out_proj", f"o[h={tn}]{note}"


# A mixer projection that takes teacher heads: (the projection, (its head-count param, value), (its head-dim param, value)).
HeadTarget = tuple[nn.Linear, tuple[str, int], tuple[str, int]]


@torch.no_grad()
def transfer_qkvo(
    owner: str, d_model: int, w: AttentionWeights, init: Any, *, C: HeadTarget, B: HeadTarget, x: HeadTarget,
    out: tuple[nn.Linear, int, int],
) -> dict[str, str]:
    """The Q -> C, K -> B, V -> x, O -> out_proj copies ``init`` turns on (``q_to_C`` ...); returns their record.

    ``out`` is ``(out_proj, n_heads, head_dim)``. MOHAWK (arXiv 2408.10189) initialises C, B, x from
    Q, K, V; Mamba-in-the-Llama (arXiv 2408.15237) also O -> out_proj. Errors name the mixer parameter.
    """
    s = w.shape
    if s.d_model != d_model:
        raise ValueError(f"{owner}: teacher d_model {s.d_model} != mixer d_model {d_model}")
    teacher = (s.n_heads, s.n_kv_heads, s.head_dim)
    plan = [  # option, target, source, source bias, per-query or per-KV, name
        ("q_to_C", C, w.q, w.q_bias, "q", "q"),
        ("k_to_B", B, w.k, w.k_bias, "kv", "k"),
        ("v_to_x", x, w.v, w.v_bias, "kv", "v"),
    ]
    record = dict(
        transfer_heads(owner, flag, proj, count, dim, src, bias, teacher, kind, name)
        for flag, (proj, count, dim), src, bias, kind, name in plan
        if getattr(init, flag)
    )
    if init.o_to_out:
        key, text = transfer_out(owner, out[0], out[1], out[2], w.o, w.o_bias)
        record[key] = text
    return record


def split_conv_window(history: torch.Tensor | None, d_inner: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A cached conv window ``(b, d_inner + bc channels, k-1)`` -> (x part, B|C part); (None, None) without one."""
    if history is None:
        return None, None
    return history[:, :d_inner], history[:, d_inner:]
