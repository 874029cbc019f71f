"""The CUDA fast path: mamba-ssm's Triton SSD kernel behind a small, documented shim.

Only :mod:`surgery.ops` imports this module, and only for CUDA tensors, so CPU code never
imports ``triton`` or ``mamba_ssm``.

**Why a shim.** mamba-ssm (Apache-2.0) is installed without its CUDA extensions
(``MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-deps
--no-build-isolation mamba-ssm``). Its top-level ``__init__`` then fails on an unguarded
``import selective_scan_cuda``, although the Triton SSD kernels themselves are pure
Python + Triton. :func:`load_kernel` registers a bare package object for ``mamba_ssm``
(with the real package directory as its ``__path__``) in ``sys.modules`` *before* importing
``mamba_ssm.ops.triton.ssd_combined``, so Python resolves the submodules without executing
the broken ``__init__``. A full mamba-ssm install (with extensions) works the same way: an
already imported ``mamba_ssm`` is left alone.

**Kernel contract** (mamba-ssm 2.3.x)::

    mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
        initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
        dt_limit=(0, inf), return_final_states=False)
    x (b, L, h, p), dt (b, L, h), A (h,), B / C (b, L, g, n), D (h,), initial_states (b, h, p, n)

computes ``H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T``, ``y_t = C_t H_t + D x_t``
(forward and backward, final states in float32).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable

import torch

from .ssd_reference import _common_groups, skip_term

_KERNEL: Callable[..., object] | None = None
_LOAD_ERROR: str | None = None


def load_kernel() -> Callable[..., object] | None:
    """``mamba_chunk_scan_combined``, or None when mamba-ssm / triton cannot be imported (reason in :func:`load_error`)."""
    global _KERNEL, _LOAD_ERROR
    if _KERNEL is not None or _LOAD_ERROR is not None:
        return _KERNEL
    try:
        if "mamba_ssm" not in sys.modules:
            spec = importlib.util.find_spec("mamba_ssm")  # locates the package without running its __init__
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("mamba_ssm is not installed")
            package = types.ModuleType("mamba_ssm")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            package.__file__ = spec.origin
            sys.modules["mamba_ssm"] = package
        module = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        _KERNEL = module.mamba_chunk_scan_combined
    except Exception as err:  # ImportError, or a Triton / CUDA error raised at import
        _LOAD_ERROR = f"{type(err).__name__}: {err}"
    return _KERNEL


def load_error() -> str | None:
    """Why :func:`load_kernel` returned None (None if it did not fail)."""
    return _LOAD_ERROR


def kernel_chunk_size(chunk_size: int) -> int:
    """The kernel's chunk size: the next power of two >= ``chunk_size`` (at least 16).

    The result does not depend on the chunk size (only the rounding does); Triton block shapes
    must be powers of two.
    """
    return max(16, 1 << math.ceil(math.log2(max(chunk_size, 1))))


def ssd_dt_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 form on the kernel: x (b, L, h, p), dt (b, L, h) >= 0, A (h,) < 0, B (b, L, gB, n), C (b, L, gC, n),
    seq_idx (b, L) document ids.

    Returns y (b, L, h, p) in x's dtype and the final state (b, h, p, n) in float32. ``B`` and
    ``C`` are expanded to one group count (the kernel takes a single ``g``).
    """
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError(f"mamba-ssm Triton kernel unavailable: {_LOAD_ERROR}")
    B, C = _common_groups(B, C, x.shape[2])
    B = B.to(x.dtype).contiguous()  # (b, L, g, n)
    C = C.to(x.dtype).contiguous()  # (b, L, g, n)
    y, final = kernel(
        x,
        dt.float(),
        A.float(),
        B,
        C,
        kernel_chunk_size(chunk_size),
        D=None if D is None else D.float(),
        initial_states=initial_state,
        seq_idx=None if seq_idx is None else seq_idx.to(torch.int32).contiguous(),
        return_final_states=True,
    )
    return y, final


def ssd_triton(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decay form on the kernel (discrete Mamba-2: input-dependent decay, no input scaling).

    Mapping (as in the public Phi-Mamba code): ``dt = -log_a = softplus(A_log) >= 0``,
    ``A = -1`` per head, and ``x / dt`` as the kernel's input, so that the kernel's
    ``exp(dt A) = exp(log_a)`` and ``dt * (x / dt) = x``.

    Numerical caveats: (1) tokens with ``dt == 0`` (padding, where ``log_a`` is set to 0 and
    ``x`` to 0) get input 0 instead of 0/0; a real token whose ``softplus(A_log)`` underflows
    to 0 (A_log < about -88 in float32) would lose its input. A mixer without decay must call
    :func:`surgery.ops.ssd` with ``log_a=None`` (mapped to ``dt = 1, A = 0``), never zeros. (2) For small ``dt`` the kernel
    input ``x / dt`` is large; it is rounded to x's dtype (relative error of that dtype, no
    overflow in bf16/fp32; float16 can overflow for ``|x| / dt > 65504``). (3) The gradient
    w.r.t. ``dt`` is the sum of the kernel's ``dL/ddt`` and ``-x/dt^2 dL/d(x/dt)``, two terms
    that cancel analytically; for tiny ``dt`` this loses relative precision. All computed in
    float32 before the cast.
    """
    dt = -log_a.float()  # (b, L, h), >= 0
    safe = torch.where(dt > 0, dt, torch.ones_like(dt))
    x_in = (x.float() / safe[..., None]).to(x.dtype)  # (b, L, h, p)
    A = -torch.ones(x.shape[2], device=x.device, dtype=torch.float32)
    y, final = ssd_dt_triton(x_in, dt, A, B, C, chunk_size, D=None, initial_state=initial_state, seq_idx=seq_idx)
    if D is not None:  # D multiplies the unscaled x (the kernel's D would multiply x / dt)
        y = y + skip_term(D, x)
    return y, final
