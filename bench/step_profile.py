"""Where one training step's time goes: ``torch.profiler`` over a callable, summarised.

Used by ``bench/train.py --profile DIR``. Prints (and writes to ``DIR/summary.txt``) the step's
wall time against the device's busy time, the kernel time grouped by kind and the top kernels;
``DIR/trace.json`` is the Chrome trace.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

# Kernel kinds, by the first pattern (lower-case substring) a kernel's name contains. Triton kernels
# are told by their names first (see kind_of): CUDA library kernels carry namespaces, templates or
# the prefixes below.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),  # before convolution: cuDNN's SDPA kernels say "cudnn"
    ("convolution", ("conv", "cudnn", "wgrad", "dgrad", "fprop", "implicit")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_", "sm100_", "cublas", "matmul", "addmm")),
    ("triton", ("triton_",)),  # inductor's kernels under a decorated name
    ("reduction", ("reduce", "softmax", "norm", "sum_", "welford")),
    ("copy / cast", ("copy", "cat", "memcpy", "memset", "fill", "index", "gather", "scatter")),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "pointwise")),
)


def kind_of(name: str) -> str:
    """The kind of a kernel, from its name (``other`` when no pattern matches)."""
    if re.fullmatch(r"_[A-Za-z0-9_]*|triton_[A-Za-z0-9_]*", name):  # ours and mamba-ssm's are _private; inductor's triton_*
        return "triton"
    low = name.lower()
    for kind, patterns in KINDS:
        if any(p in low for p in patterns):
            return kind
    return "triton" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else "other"


def device_events(prof: Any) -> list[tuple[str, float, int]]:
    """``(kernel name, device microseconds, calls)`` for every kernel the profiler saw on the device."""
    out = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us and e.device_type == torch.autograd.DeviceType.CUDA:
            out.append((e.key, float(us), int(e.count)))
    return out


def summarise(wall_s: float, events: list[tuple[str, float, int]], top: int = 25) -> str:
    """The text of the summary: busy vs wall, time by kind, the ``top`` kernels."""
    busy_us = sum(us for _, us, _ in events)
    lines = [f"step wall {wall_s * 1e3:.1f} ms; device busy {busy_us / 1e3:.1f} ms "
             f"({100 * busy_us / max(wall_s * 1e6, 1e-9):.0f}% of wall); {sum(c for *_, c in events)} kernel launches"]
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us, calls in events:
        totals = by_kind[kind_of(name)]
        totals[0] += us
        totals[1] += calls
    lines += ["", "| kind | ms | share of busy | launches |", "| --- | --- | --- | --- |"]
    for kind, (us, calls) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {kind} | {us / 1e3:.2f} | {100 * us / max(busy_us, 1e-9):.1f}% | {calls} |")
    lines += ["", "| kernel | kind | ms | launches |", "| --- | --- | --- | --- |"]
    for name, us, calls in sorted(events, key=lambda e: -e[1])[:top]:
        lines.append(f"| {name[:90]} | {kind_of(name)} | {us / 1e3:.2f} | {calls} |")
    return "\n".join(lines)


def profile_run(step: Callable[[], Any], device: torch.device, out_dir: Path) -> str:
    """Run ``step()`` once under the profiler; print and write the summary and the trace."""
    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    text = f"# {out_dir.name}\n" + summarise(wall, device_events(prof))
    if device.type != "cuda":
        text += "\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (out_dir / "summary.txt").write_text(text + "\n")
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    print(text)
    return text
