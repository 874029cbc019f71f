"""A rough wall-time estimate of a plan, for messages that refuse one (see :func:`surgery.data.check_repeats`)."""

from __future__ import annotations

import time
from typing import Any

import torch


def human_duration(seconds: float) -> str:
    """``7.3e11`` -> ``'about 2.31e+04 years'``, ``5400`` -> ``'about 90 minutes'``."""
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"about {seconds / size:,.3g} {unit}"
    return f"about {seconds:.0f} seconds"


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def estimate_training_seconds(recipe: Any, teacher: torch.nn.Module, student: torch.nn.Module,
                              tokens: torch.Tensor, device: torch.device) -> float:
    """Seconds the enabled stages would train, from timed teacher forward passes on this device
    (the fastest of three after a warm-up).

    A trained token costs one teacher forward plus a student forward and backward (about three
    forwards), each in proportion to the model's parameters. ``tokens``: 1-D training tokens
    (at least one sequence of the first enabled stage). A rough figure, low rather than high:
    optimizer steps, stage 1's quadratic matrices and evaluation passes are left out (on the tiny
    recipe, 2-core CPU, it said 13 s for 51 s of training).
    """
    stage = next(i for i in (1, 2, 3) if recipe.stage(i).enabled)
    seq_len = recipe.seq_len(stage)
    rows = max(1, min(recipe.stage(stage).micro_batch, tokens.numel() // seq_len))
    batch = tokens[: rows * seq_len].view(rows, seq_len).to(device=device, dtype=torch.long)  # (b, L)
    timings = []
    with torch.inference_mode():
        teacher(input_ids=batch, use_cache=False)  # warm-up: the first call pays one-time costs
        for _ in range(3):
            start = time.perf_counter()
            teacher(input_ids=batch, use_cache=False)
            timings.append(time.perf_counter() - start)
    forward = min(timings) / batch.numel()  # seconds per token
    per_token = forward * (1 + 3 * _params(student) / max(1, _params(teacher)))
    return per_token * sum(recipe.stage(i).tokens for i in (1, 2, 3) if recipe.stage(i).enabled)


__all__ = ["estimate_training_seconds", "human_duration"]
