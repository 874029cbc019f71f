"""Checks every mixer must pass, shared by the mixer tests: decoding and padding against the full forward.

Each returns the worst relative error (float64 mixers give ~1e-15 when the property holds).
"""

from __future__ import annotations

import torch

from ..cache import SSMCacheLayer
from .base import Mixer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error of ``a`` against ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def decode_error(mixer: Mixer, u: torch.Tensor) -> float:
    """Prefill 5 tokens, decode 4 one at a time, continue with the rest: against one full forward.

    u: (b, L, d_model) with L >= 10.
    """
    full = mixer.mix(u)
    slot = SSMCacheLayer()
    parts = [mixer.mix(u[:, :5], cache=slot)]  # prefill
    parts += [mixer.mix(u[:, i : i + 1], cache=slot) for i in range(5, 9)]  # decode steps
    parts.append(mixer.mix(u[:, 9:], cache=slot))  # a multi-token continuation
    if slot.get_seq_length() != u.shape[1]:
        raise AssertionError(f"the cache counts {slot.get_seq_length()} tokens, not {u.shape[1]}")
    return rel(torch.cat(parts, 1), full)


def left_padding_error(mixer: Mixer, u: torch.Tensor,
                       pad: torch.Tensor) -> tuple[float, torch.Tensor, SSMCacheLayer, SSMCacheLayer]:
    """Left-padded (garbage in the padding) against unpadded; also the mask and both caches, for further checks.

    u: (1, L, d_model); pad: (1, P, d_model).
    """
    mask = torch.tensor([[False] * pad.shape[1] + [True] * u.shape[1]])
    slot_a, slot_b = SSMCacheLayer(), SSMCacheLayer()
    out_pad = mixer.mix(torch.cat([pad, u], 1), mask, cache=slot_a)
    out = mixer.mix(u, cache=slot_b)
    return rel(out_pad[:, pad.shape[1] :], out), mask, slot_a, slot_b
