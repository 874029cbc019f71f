"""Device, dtype and seeding: resolved once from the recipe or flags."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext

import torch

from .errors import SurgeryError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError(f"device {spec!r} was asked for but CUDA is not available here; use device=cpu or auto")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU of compute capability 8.0 or later
    (Ampere on; earlier ones emulate bf16), or a CPU with AVX512-BF16 or AMX.

    On such a CPU oneDNN's bf16 matmuls run about 4x its float32 ones (826 against 204 GFLOP/s on
    the 2-core AMD EPYC of docs/benchmarks.md); without them bf16 is emulated and slower than float32.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision``; None means float32.

    ``auto``: bf16 on CUDA, float32 elsewhere; ``bf16-if-native``: bf16 where :func:`native_bf16`.
    """
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if precision == "bf16-if-native" and native_bf16(device):
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """An autocast context for ``precision`` on ``device`` (a no-op for float32), without autocast's weight cache.

    The cache keeps one low-precision copy of each weight for the whole region. Under FSDP2 a
    ``no_grad`` forward inside the region (stage 3's first micro-batch probes the student's head
    without gradients) leaves cached copies without autograd history, and the weights' gradients of
    the forward that follows come back ``None``: ``torchrun --nproc-per-node 1`` lost every matmul
    weight's first-step gradient on the H200 and on CPU in bf16 (``bench/grad_probe.py``;
    tests/test_fsdp_one_rank.py). Each weight is used once per forward, so the cache saved nothing.
    """
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)
