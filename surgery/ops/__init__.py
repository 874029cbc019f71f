"""SSD kernels behind two dispatching entry points.

* :func:`ssd` -- decay form (discrete Mamba-2): per-token log-decay ``log_a``, input ``x``.
* :func:`ssd_dt` -- Mamba-2 form: ``dt``, per-head ``A``; decay ``exp(dt A)``, input ``dt x``.

Both return ``(y (b, L, h, p), final_state (b, h, p, n))``. On CUDA tensors they run
mamba-ssm's Triton ``mamba_chunk_scan_combined`` (forward and backward) through
:mod:`surgery.ops.cuda`; where it cannot be imported they fall back to the plain-torch
reference (:mod:`surgery.ops.ssd_reference`) with a one-time warning. CPU tensors always
take the reference and never import triton or mamba_ssm.

:func:`ssd_step` (one decoding step) and :func:`ssd_matrix` (the materialised mixing matrix
for MOHAWK stage 1, Bick et al. 2024, arXiv 2408.10189) are plain torch on every device.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from .ssd_reference import compute_dtype, segsum, skip_term, ssd_chunked, ssd_matrix, ssd_naive, ssd_step

Backend = Literal["auto", "reference", "triton"]
_WARNED = False
_DEFAULT_BACKEND: Backend = "auto"

__all__ = [
    "Backend",
    "compute_dtype",
    "kernel_available",
    "segsum",
    "skip_term",
    "ssd",
    "ssd_chunked",
    "ssd_dt",
    "dt_to_decay",
    "ssd_matrix",
    "ssd_naive",
    "ssd_step",
    "use_backend",
]


@contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Within the block, :func:`ssd` / :func:`ssd_dt` calls without ``backend=`` use ``backend``
    (e.g. ``"reference"`` to run a whole model on the plain-torch path; tests and benchmarks)."""
    global _DEFAULT_BACKEND
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    previous, _DEFAULT_BACKEND = _DEFAULT_BACKEND, backend
    try:
        yield
    finally:
        _DEFAULT_BACKEND = previous


def kernel_available(device: torch.device | str) -> bool:
    """Whether the Triton kernel serves tensors on ``device`` (imports it only for CUDA devices)."""
    if torch.device(device).type != "cuda":
        return False
    from . import cuda

    return cuda.load_kernel() is not None


def _use_triton(x: torch.Tensor, backend: Backend | None) -> bool:
    global _WARNED
    backend = _DEFAULT_BACKEND if backend is None else backend
    if backend == "reference":
        return False
    if backend not in ("auto", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    if not x.is_cuda:
        if backend == "triton":
            raise RuntimeError("backend='triton' needs CUDA tensors")
        return False
    from . import cuda

    if cuda.load_kernel() is not None:
        return True
    if backend == "triton":
        raise RuntimeError(f"mamba-ssm Triton kernel unavailable: {cuda.load_error()}")
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"mamba-ssm Triton SSD kernel unavailable ({cuda.load_error()}); using the plain-torch reference "
            "on CUDA (slower). Install mamba-ssm (see surgery/ops/cuda.py).",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def ssd(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decay-form SSD: ``H_t = exp(log_a_t) H_{t-1} + x_t B_t^T``, ``y_t = H_t C_t + D x_t``.

    x (b, L, h, p), log_a (b, L, h) <= 0, B (b, L, gB, n), C (b, L, gC, n), D (h,),
    initial_state (b, h, p, n) -> y (b, L, h, p), final state (b, h, p, n). ``backend``: "auto"
    (Triton on CUDA when available), "reference" or "triton"; None: the :func:`use_backend` default.
    """
    if x.shape[1] > 0 and _use_triton(x, backend):
        from .cuda import ssd_triton

        return ssd_triton(x, log_a, B, C, chunk_size, D=D, initial_state=initial_state)
    return ssd_chunked(x, log_a, B, C, chunk_size, D=D, initial_state=initial_state)


def ssd_dt(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2-form SSD: ``H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T``, ``y_t = H_t C_t + D x_t``.

    x (b, L, h, p), dt (b, L, h) >= 0, A (h,) < 0, B (b, L, gB, n), C (b, L, gC, n), D (h,),
    initial_state (b, h, p, n) -> y (b, L, h, p), final state (b, h, p, n).
    """
    if x.shape[1] > 0 and _use_triton(x, backend):
        from .cuda import ssd_dt_triton

        return ssd_dt_triton(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)
    log_a, x_in = dt_to_decay(x, dt, A)
    y, final = ssd_chunked(x_in, log_a, B, C, chunk_size, initial_state=initial_state)
    if D is not None:
        y = y + skip_term(D, x.to(y.dtype))
    return y.to(x.dtype), final


def dt_to_decay(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 form -> decay form: ``log_a = dt A`` (b, L, h), input ``dt x`` (b, L, h, p), in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    dt = dt.to(dtype)
    return dt * A.to(dtype), x.to(dtype) * dt[..., None]
