"""SSD kernels behind two dispatching entry points.

* :func:`ssd` -- decay form (discrete Mamba-2): per-token log-decay ``log_a``, input ``x``.
* :func:`ssd_dt` -- Mamba-2 form: ``dt``, per-head ``A``; decay ``exp(dt A)``, input ``dt x``.

Both return ``(y (b, L, h, p), final_state (b, h, p, n))``. Backends:

* ``"fused"`` -- surgery's own Triton kernels for the decay form (:mod:`surgery.ops.ssd_fused`,
  forward and backward; the dt form maps onto it as ``log_a = dt A``, input ``dt x``);
* ``"mamba_ssm"`` -- mamba-ssm's Triton ``mamba_chunk_scan_combined`` (:mod:`surgery.ops.cuda`);
* ``"reference"`` -- the plain-torch chunked SSD (:mod:`surgery.ops.ssd_reference`), any device.

``"auto"`` (the default; ``SURGERY_SSD_BACKEND`` in the environment sets another) takes, on
CUDA tensors, the first of fused / mamba-ssm that imports (:data:`PREFERENCE`), else the
reference with a one-time warning. CPU tensors always take the reference and never import
triton or mamba_ssm.

:func:`conv_kernel_applies` says whether a mixer's short causal convolution runs on the fused
Triton kernel (:mod:`surgery.ops.conv_fused`): CUDA tensors, under any backend but ``"reference"``,
and only with ``SURGERY_NEW_GPU_KERNELS=1`` (:func:`new_gpu_kernels`): it passes its float64
checks in Triton's interpreter and on an H100, but has not yet been measured faster end to end.

:func:`ssd_step` (one decoding step) and :func:`ssd_matrix` (the materialised mixing matrix
for MOHAWK stage 1, Bick et al. 2024, arXiv 2408.10189) are plain torch on every device.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from .ssd_reference import compute_dtype, segsum, skip_term, ssd_chunked, ssd_matrix, ssd_naive, ssd_step

Backend = Literal["auto", "reference", "fused", "mamba_ssm"]
BACKENDS = ("auto", "reference", "fused", "mamba_ssm")
# Head dims and state sizes the fused kernels are validated for on the GPU (p, n <= 64; 128-wide tiles
# compiled too slowly in the first GPU run): larger shapes take the next backend.
FUSED_MAX_DIM = 64
# Fast backends "auto" tries on CUDA, per entry point, in order (bench/mixers.py measures them side by side).
PREFERENCE: dict[str, tuple[str, ...]] = {"ssd": ("fused", "mamba_ssm"), "ssd_dt": ("fused", "mamba_ssm")}
_WARNED = False
_DEFAULT_BACKEND: Backend = os.environ.get("SURGERY_SSD_BACKEND", "auto")  # type: ignore[assignment]
if _DEFAULT_BACKEND not in BACKENDS:
    raise ValueError(f"SURGERY_SSD_BACKEND={_DEFAULT_BACKEND!r}: expected one of {', '.join(BACKENDS)}")

__all__ = [
    "Backend",
    "compute_dtype",
    "conv_kernel_applies",
    "new_gpu_kernels",
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
    _check_backend(backend)
    previous, _DEFAULT_BACKEND = _DEFAULT_BACKEND, backend
    try:
        yield
    finally:
        _DEFAULT_BACKEND = previous


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def _load(backend: str) -> tuple[bool, str | None]:
    """Whether a fast backend imports here, and why not."""
    if backend == "fused":
        try:
            from . import ssd_fused  # noqa: F401  (imports triton)
        except Exception as err:  # ImportError, or a Triton / CUDA error at import
            return False, f"{type(err).__name__}: {err}"
        return True, None
    from . import cuda

    return cuda.load_kernel() is not None, cuda.load_error()


def kernel_available(device: torch.device | str, backend: str = "fused") -> bool:
    """Whether ``backend`` ("fused" or "mamba_ssm") serves tensors on ``device`` (imports it only for CUDA)."""
    if torch.device(device).type != "cuda":
        return False
    return _load(backend)[0]


def new_gpu_kernels() -> bool:
    """Whether ``SURGERY_NEW_GPU_KERNELS=1``: the GPU paths not yet shown faster end to end are used.

    The fused causal conv and the compiled stage-3 loss terms pass their float64 checks on CPU
    (Triton's interpreter, plain torch) and on an H100 (tests/test_gpu_mixers.py,
    tests/test_gpu_losses.py, 2026-12-07). Stage 3 with them (and without the mixers' host read)
    ran at 52.2k tokens/s against 54.7k with none of the three (3 steps each, one H100 call; the
    step is bound by the host launching ~39k kernels, docs/benchmarks.md), so they stay opt-in
    until a measurement says they help. PyTorch's fused AdamW on CUDA (:func:`verify.runner.build_optimizer`)
    is under the same switch. Read at each call.
    """
    return os.environ.get("SURGERY_NEW_GPU_KERNELS", "0") == "1"


def conv_kernel_applies(x: torch.Tensor) -> bool:
    """Whether the depthwise causal conv of ``x`` runs on the fused kernel (CUDA, not the reference backend)."""
    return (x.is_cuda and x.shape[1] > 0 and _DEFAULT_BACKEND != "reference" and new_gpu_kernels()
            and _load("fused")[0])


def _fits(candidate: str, dims: tuple[int, int]) -> tuple[bool, str | None]:
    """Whether ``candidate`` takes head dim and state size ``dims``."""
    if candidate == "fused" and max(dims) > FUSED_MAX_DIM:
        return False, f"head dim {dims[0]} / state {dims[1]} above the fused kernels' {FUSED_MAX_DIM}"
    return True, None


def _fast_backend(x: torch.Tensor, backend: Backend | None, entry: str, dims: tuple[int, int]) -> str | None:
    """The fast backend to run (None: the reference); ``dims``: (head dim p, state size n)."""
    global _WARNED
    backend = _DEFAULT_BACKEND if backend is None else backend
    _check_backend(backend)
    if backend == "reference":
        return None
    if not x.is_cuda:
        if backend != "auto":
            raise RuntimeError(f"backend={backend!r} needs CUDA tensors")
        return None
    if backend != "auto":
        ok, why = _fits(backend, dims)
        if ok:
            ok, why = _load(backend)
        if not ok:
            raise RuntimeError(f"the {backend} kernels are unavailable: {why}")
        return backend
    reasons = []
    for candidate in PREFERENCE[entry]:
        ok, why = _fits(candidate, dims)
        if ok:
            ok, why = _load(candidate)
        if ok:
            return candidate
        reasons.append(f"{candidate}: {why}")
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"no Triton SSD kernel imports ({'; '.join(reasons)}); using the plain-torch reference on CUDA "
            "(slower). Install triton (and optionally mamba-ssm, see surgery/ops/cuda.py).",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


def ssd(
    x: torch.Tensor,
    log_a: torch.Tensor | None,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decay-form SSD: ``H_t = exp(log_a_t) H_{t-1} + x_t B_t^T``, ``y_t = H_t C_t + D x_t``.

    x (b, L, h, p), log_a (b, L, h) <= 0, B (b, L, gB, n), C (b, L, gC, n), D (h,),
    initial_state (b, h, p, n), seq_idx (b, L) document ids of packed sequences (the state is
    reset where the id changes) -> y (b, L, h, p), final state (b, h, p, n). ``backend``: see the
    module docstring; None: the :func:`use_backend` default. ``log_a=None``: no decay at all
    (``a_t = 1``, causal linear attention); say so rather than passing zeros, because mamba-ssm's
    decay-form mapping divides ``x`` by ``-log_a`` and would drop every zero-decay token's input.
    """
    fast = _fast_backend(x, backend, "ssd", (x.shape[-1], B.shape[-1])) if x.shape[1] > 0 else None
    if log_a is None:
        if fast == "mamba_ssm":  # a_t = exp(dt A) = 1 and dt x = x exactly: dt = 1, A = 0
            from .cuda import ssd_dt_triton

            dt = x.new_ones(x.shape[:3], dtype=torch.float32)  # (b, L, h)
            A = x.new_zeros(x.shape[2], dtype=torch.float32)  # (h,)
            y, final = ssd_dt_triton(x, dt, A, B, C, chunk_size, initial_state=initial_state, seq_idx=seq_idx)
            return (y if D is None else y + skip_term(D, x)), final
        log_a = x.new_zeros(x.shape[:3], dtype=compute_dtype(x.dtype))  # (b, L, h)
    if fast == "fused":
        from .ssd_fused import ssd_fused

        return ssd_fused(x, log_a, B, C, chunk_size, D=D, initial_state=initial_state, seq_idx=seq_idx)
    if fast == "mamba_ssm":
        from .cuda import ssd_triton

        return ssd_triton(x, log_a, B, C, chunk_size, D=D, initial_state=initial_state, seq_idx=seq_idx)
    return ssd_chunked(x, log_a, B, C, chunk_size, D=D, initial_state=initial_state, seq_idx=seq_idx)


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
    seq_idx: torch.Tensor | None = None,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2-form SSD: ``H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T``, ``y_t = H_t C_t + D x_t``.

    x (b, L, h, p), dt (b, L, h) >= 0, A (h,) < 0, B (b, L, gB, n), C (b, L, gC, n), D (h,),
    initial_state (b, h, p, n), seq_idx (b, L) -> y (b, L, h, p), final state (b, h, p, n).
    """
    fast = _fast_backend(x, backend, "ssd_dt", (x.shape[-1], B.shape[-1])) if x.shape[1] > 0 else None
    if fast == "mamba_ssm":
        from .cuda import ssd_dt_triton

        return ssd_dt_triton(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state, seq_idx=seq_idx)
    log_a, x_in = dt_to_decay(x, dt, A)
    if fast == "fused":
        from .ssd_fused import ssd_fused

        y, final = ssd_fused(x_in.to(x.dtype), log_a, B, C, chunk_size, initial_state=initial_state, seq_idx=seq_idx)
    else:
        y, final = ssd_chunked(x_in, log_a, B, C, chunk_size, initial_state=initial_state, seq_idx=seq_idx)
    if D is not None:
        y = y + skip_term(D, x.to(y.dtype))
    return y.to(x.dtype), final


def dt_to_decay(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 form -> decay form: ``log_a = dt A`` (b, L, h), input ``dt x`` (b, L, h, p), in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    dt = dt.to(dtype)
    return dt * A.to(dtype), x.to(dtype) * dt[..., None]
