"""Benchmark the SSD mixer core against causal attention.

    python bench/mixers.py            # GPU: (b=8, L=2048) and (b=1, L=16384), 9 heads, head dim 64, state 64, bf16
    python bench/mixers.py --quick    # tiny CPU smoke run

Rows, forward and forward+backward, in ms and as a ratio to SDPA:

* ``ssd reference`` -- our plain-torch chunked SSD (:func:`surgery.ops.ssd_chunked`, computed in float32),
* ``ssd fused``     -- surgery's fused Triton kernels (:mod:`surgery.ops.ssd_fused`), decay form,
* ``ssd mamba-ssm`` -- mamba-ssm's ``mamba_chunk_scan_combined`` through our dispatch
  (discrete-Mamba-2 decay form, i.e. including the ``x / dt`` mapping of :mod:`surgery.ops.cuda`),
* ``ssd mamba-ssm dt-form`` -- the same kernel in its native Mamba-2 form (no ``x / dt``),
* ``ssd fused dt-form`` -- the Mamba-2 form on surgery's kernels (``log_a = dt A``, input ``dt x``),
* ``sdpa causal``   -- ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``,
* ``stage1 materialised`` / ``stage1 fused`` -- the stage-1 loss (teacher softmax of ``q k^T``,
  student SSD matrix, Frobenius distance; :func:`surgery.ops.stage1.matrix_squared_distance`),
  with the peak memory of its forward+backward.

GPU timing uses CUDA events after warmup (median of the timed iterations); CPU uses perf_counter.
A row whose run fails (e.g. out of memory, kernel missing) prints the error instead of a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery import ops  # noqa: E402
from surgery.ops.stage1 import MatrixFactors, matrix_squared_distance  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_cases(b: int, L: int, h: int, p: int, n: int, dtype: torch.dtype, device: torch.device, chunk: int,
               stage1_len: int | None = None, backends: tuple[str, ...] = ("fused", "mamba_ssm")):
    """name -> (forward, forward+backward) closures (the materialised stage 1 only up to ``stage1_len``)."""
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()

    x, B, C = r(b, L, h, p), r(b, L, h, n, scale=n**-0.5), r(b, L, h, n, scale=n**-0.5)
    A_log = r(b, L, h)
    q, k, v = r(b, h, L, p), r(b, h, L, p), r(b, h, L, p)
    dy = torch.randn(b, L, h, p, generator=g, device=device, dtype=torch.float32).to(dtype)
    do = dy.transpose(1, 2)

    def ssd(backend: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            log_a = -F.softplus(A_log.float())
            return ops.ssd(x, log_a, B, C, chunk_size=chunk, backend=backend)[0]

        return run

    dt_raw, A = r(b, L, h), -torch.rand(h, generator=g, device=device) - 0.5

    def ssd_dt(backend: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            return ops.ssd_dt(x, F.softplus(dt_raw.float()), A, B, C, chunk_size=chunk, backend=backend)[0]

        return run

    Bg = r(b, L, max(1, h // 3), n, scale=n**-0.5)  # GQA-shared B, as students have it (3 query heads per group)

    def stage1(backend: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            factors = MatrixFactors(-F.softplus(A_log.float()), Bg, C, D=None)
            return matrix_squared_distance(q, k, p**-0.5, factors, backend=backend).sqrt().mean()

        return run

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()

        return run

    def fwd_bwd(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            out = fn()
            out.backward(grad.to(out.dtype))

        return run

    one = torch.ones((), device=device)
    cases = {"ssd reference": (fwd(ssd("reference")), fwd_bwd(ssd("reference"), dy))}
    if device.type == "cuda":
        for name, backend in (("fused", "fused"), ("mamba-ssm", "mamba_ssm")):
            if backend not in backends:
                continue
            cases[f"ssd {name}"] = (fwd(ssd(backend)), fwd_bwd(ssd(backend), dy))
            cases[f"ssd {name} dt-form"] = (fwd(ssd_dt(backend)), fwd_bwd(ssd_dt(backend), dy))
    cases["sdpa causal"] = (fwd(sdpa), fwd_bwd(sdpa, do))
    if stage1_len is None or L <= stage1_len:
        cases["stage1 materialised"] = (fwd(stage1("reference")), fwd_bwd(stage1("reference"), one))
    if device.type == "cuda":
        cases["stage1 fused"] = (fwd(stage1("fused")), fwd_bwd(stage1("fused"), one))
    return cases


def run_shape(b: int, L: int, args: argparse.Namespace, device: torch.device) -> list[tuple[str, ...]]:
    dtype = DTYPES[args.dtype]
    cases = make_cases(b, L, args.heads, args.head_dim, args.d_state, dtype, device, args.chunk_size,
                       stage1_len=args.stage1_max_len, backends=tuple(args.backends.split(",")))
    results: dict[str, list[float | str]] = {}
    peaks: dict[str, float] = {}
    for name, pair in cases.items():
        row: list[float | str] = []
        for i, fn in enumerate(pair):
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                row.append(timed(fn, device, args.warmup, args.iters))
                if device.type == "cuda" and i == 1:
                    peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            except Exception as err:  # OOM, missing kernel: report and go on
                row.append(f"{type(err).__name__}: {str(err).splitlines()[0][:60]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        results[name] = row
    base = results["sdpa causal"]
    rows = []
    for name, (f, fb) in results.items():

        def cell(t: float | str, ref: float | str) -> tuple[str, str]:
            if isinstance(t, str):
                return t, "-"
            ratio = f"{t / ref:.2f}x" if isinstance(ref, float) else "-"
            return f"{t:.3f}", ratio

        (fs, fr), (bs, br) = cell(f, base[0]), cell(fb, base[1])
        peak = f"{peaks[name]:.2f}" if name in peaks else "n/a"
        rows.append((f"b={b} L={L}", name, f"{fs} ({fr})", f"{bs} ({br})", peak))
    return rows


def main(argv: list[str] | None = None) -> list[tuple[str, ...]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU (smoke test)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--backends", default="fused,mamba_ssm", help="fast SSD backends to time (comma-separated)")
    parser.add_argument("--stage1-max-len", type=int, default=2048,
                        help="longest sequence for the materialised stage-1 row (it grows as L^2)")
    args = parser.parse_args(argv)
    if args.quick:
        device = torch.device("cpu")
        shapes = [(2, 64), (1, 128)]
        args.dtype, args.heads, args.head_dim, args.d_state, args.chunk_size = "fp32", 2, 8, 8, 16
        args.warmup, args.iters = 1, 2
    else:
        if not torch.cuda.is_available():
            parser.error("needs CUDA (or pass --quick for a CPU smoke run)")
        device = torch.device("cuda")
        shapes = [(8, 2048), (1, 8192), (1, 16384)]
    print(
        f"# {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} dtype={args.dtype} "
        f"heads={args.heads} head_dim={args.head_dim} d_state={args.d_state} chunk={args.chunk_size}; "
        "ms (ratio to sdpa causal), median"
    )
    rows: list[tuple[str, ...]] = []
    for b, L in shapes:
        rows += run_shape(b, L, args, device)
    header = ("shape", "what", "fwd ms", "fwd+bwd ms", "fwd+bwd peak GiB")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return rows


if __name__ == "__main__":
    main()
