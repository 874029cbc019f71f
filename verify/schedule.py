"""Warmup-stable-decay (WSD) learning-rate schedule (Hu et al., MiniCPM, arXiv 2404.06395)."""

from __future__ import annotations

import math


def wsd_factor(step: int, total: int, warmup: float, decay: float, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``.

    Linear warmup over the first ``warmup`` fraction of steps, constant, then linear decay
    to ``min_ratio`` over the last ``decay`` fraction.
    """
    if total <= 0:
        raise ValueError("total steps must be positive")
    warm = math.ceil(warmup * total)
    dec = math.ceil(decay * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    start_decay = total - dec
    if dec and step >= start_decay:
        progress = (step - start_decay + 1) / dec
        return 1.0 - (1.0 - min_ratio) * progress
    return 1.0
