"""The Triton kernels on CPU, through Triton's interpreter, against the float64 references.

The fused SSD (:mod:`surgery.ops.ssd_fused`) and the fused stage-1 distance
(:mod:`surgery.ops.stage1_fused`). For developers without a GPU: ``pip install triton`` and this
runs the very kernels the GPU runs
(``TRITON_INTERPRET=1``, in a subprocess so that no other test imports triton). Skipped where
triton is not installed (CI: the GPU tests in tests/test_gpu_mixers.py check the compiled kernels
on the GPU machine). The interpreter of Triton 3.6 needs numpy < 2.3; with a newer numpy the test
says so and skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
    import json, sys
    import numpy as np
    import torch, torch.nn.functional as F
    import triton, triton.language as tl

    @triton.jit
    def probe(ptr, n):
        for i in range(n):
            tl.store(ptr + i, i)

    try:
        probe[(1,)](torch.zeros(2), 2)
    except Exception as err:
        print(json.dumps({"unsupported": f"{type(err).__name__}: {err} (numpy {np.__version__})"}))
        sys.exit(0)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()
"""

SSD = textwrap.dedent(PROBE + """
    from surgery.ops.ssd_fused import CONFIG, ssd_fused
    from surgery.ops.ssd_reference import ssd_chunked

    CONFIG["chunk"] = 16
    out = {}
    for name, (b, L, h, p, n, gB, gC, init, D, packed) in {
        "gqa_init_D": (2, 37, 4, 8, 4, 2, 4, True, True, False),
        "plain": (2, 37, 4, 8, 4, 2, 4, False, False, False),
        "odd_sizes": (2, 50, 4, 20, 17, 4, 2, True, True, False),
        "packed": (2, 37, 4, 8, 4, 2, 4, True, True, True),
    }.items():
        g = torch.Generator().manual_seed(len(out))
        t = {
            "x": torch.randn(b, L, h, p, generator=g),
            "log_a": -F.softplus(torch.randn(b, L, h, generator=g) - 1),
            "B": torch.randn(b, L, gB, n, generator=g) * n**-0.5,
            "C": torch.randn(b, L, gC, n, generator=g) * n**-0.5,
            "D": torch.randn(h, generator=g) if D else None,
            "initial_state": torch.randn(b, h, p, n, generator=g) if init else None,
        }
        seq = None
        if packed:
            seq = torch.zeros(b, L, dtype=torch.long)
            seq[:, 10:] = 1
            seq[:, 30:] = 2
            seq[1, 5:] += 1
        dy, ds = torch.randn(b, L, h, p, generator=g), torch.randn(b, h, p, n, generator=g)

        def run(fn, dtype):
            leaves = {k: (v.to(dtype).clone().requires_grad_() if v is not None else None) for k, v in t.items()}
            y, s = fn(leaves)
            torch.autograd.backward([y, s], [dy.to(y.dtype), ds.to(s.dtype)])
            return y.detach(), s.detach(), {k: v.grad for k, v in leaves.items() if v is not None}

        fast = run(lambda l: ssd_fused(l["x"], l["log_a"], l["B"], l["C"], 16, D=l["D"],
                                       initial_state=l["initial_state"], seq_idx=seq), torch.float32)
        ref = run(lambda l: ssd_chunked(l["x"], l["log_a"], l["B"], l["C"], 8, D=l["D"],
                                        initial_state=l["initial_state"], seq_idx=seq), torch.float64)
        errors = {"y": rel(fast[0], ref[0]), "final_state": rel(fast[1], ref[1])}
        errors |= {"d" + k: rel(fast[2][k], ref[2][k]) for k in fast[2]}
        out[name] = errors
    print(json.dumps(out))
""")

STAGE1 = textwrap.dedent(PROBE + """
    from surgery.ops.stage1 import MatrixFactors, matrix_squared_distance
    from surgery.ops.stage1_fused import CONFIG, squared_distance_fused

    CONFIG.update(block_m=16, block_n=16)
    out = {}
    for name, (b, h, hk, L, d, n, gB, gC, has_D, has_w) in {
        "gqa_D": (2, 4, 2, 37, 8, 4, 2, 4, True, False),
        "dt_scale_odd_sizes": (1, 2, 1, 50, 20, 17, 1, 2, True, True),
        "one_block": (2, 4, 4, 16, 16, 16, 4, 1, False, False),
    }.items():
        g = torch.Generator().manual_seed(L)
        q, k = torch.randn(b, h, L, d, generator=g), torch.randn(b, hk, L, d, generator=g)
        t = {"log_a": -torch.rand(b, L, h, generator=g), "B": torch.randn(b, L, gB, n, generator=g) * 0.5,
             "C": torch.randn(b, L, gC, n, generator=g) * 0.5, "D": torch.randn(h, generator=g) if has_D else None,
             "w": torch.rand(b, L, h, generator=g) if has_w else None}
        up = torch.randn(b, h, generator=g)

        def run(fn, dtype):
            leaves = {k_: (v.to(dtype).clone().requires_grad_() if v is not None else None) for k_, v in t.items()}
            value = fn(q.to(dtype), k.to(dtype), leaves)
            (value * up.to(dtype)).sum().backward()
            return value.detach(), {k_: v.grad for k_, v in leaves.items() if v is not None}

        fast = run(lambda q_, k_, l: squared_distance_fused(q_, k_, 0.3, l["log_a"], l["B"], l["C"], D=l["D"], w=l["w"]),
                   torch.float32)
        ref = run(lambda q_, k_, l: matrix_squared_distance(q_, k_, 0.3, MatrixFactors(**l), backend="reference"),
                  torch.float64)
        out[name] = {"distance": rel(fast[0], ref[0])} | {"d" + k_: rel(fast[1][k_], ref[1][k_]) for k_ in fast[1]}
    print(json.dumps(out))
""")

CONV = textwrap.dedent(PROBE + """
    from surgery.ops.conv_fused import CONFIG, causal_conv1d_fused

    CONFIG.update(block_t=16, block_c=16)
    out = {}
    for name, (b, L, ch, K, bias) in {
        "bias": (2, 37, 24, 4, True),  # lengths and channels not multiples of the tiles
        "no_bias": (1, 20, 16, 3, False),
        "shorter_than_kernel": (2, 2, 5, 4, True),
        "kernel_1": (1, 19, 7, 1, True),
    }.items():
        g = torch.Generator().manual_seed(len(out) + 7)
        t = {"x": torch.randn(b, L, ch, generator=g), "w": torch.randn(ch, K, generator=g),
             "bias": torch.randn(ch, generator=g) if bias else None}
        dy = torch.randn(b, L, ch, generator=g)

        def run(fn, dtype):
            leaves = {k: (v.to(dtype).clone().requires_grad_() if v is not None else None) for k, v in t.items()}
            y = fn(leaves)
            y.backward(dy.to(dtype))
            return y.detach(), {k: v.grad for k, v in leaves.items() if v is not None}

        def reference(l):  # F.conv1d on the zero-padded, transposed input: (b, ch, K-1+L) -> (b, L, ch)
            full = F.pad(l["x"].transpose(1, 2), (K - 1, 0))
            return F.conv1d(full, l["w"][:, None], l["bias"], groups=ch).transpose(1, 2)

        fast = run(lambda l: causal_conv1d_fused(l["x"], l["w"], l["bias"]), torch.float32)
        ref = run(reference, torch.float64)
        out[name] = {"y": rel(fast[0], ref[0])} | {"d" + k: rel(fast[1][k], ref[1][k]) for k in fast[1]}
    print(json.dumps(out))
""")


def interpret(script: str) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "unsupported" in result:
        pytest.skip(f"Triton's interpreter cannot run here: {result['unsupported']}")
    return result


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (the GPU tests cover the kernels)")


@needs_triton
def test_fused_ssd_matches_float64_reference_in_the_interpreter() -> None:
    result = interpret(SSD)
    bad = {case: {k: v for k, v in errs.items() if not v < 1e-5} for case, errs in result.items()}
    assert not any(bad.values()), f"relative errors above 1e-5 (float32 vs float64): {bad}; all: {result}"
    assert set(result["packed"]) == {"y", "final_state", "dx", "dlog_a", "dB", "dC", "dD", "dinitial_state"}


@needs_triton
def test_fused_stage1_distance_matches_float64_reference_in_the_interpreter() -> None:
    result = interpret(STAGE1)
    bad = {case: {k: v for k, v in errs.items() if not v < 1e-5} for case, errs in result.items()}
    assert not any(bad.values()), f"relative errors above 1e-5 (float32 vs float64): {bad}; all: {result}"
    assert set(result["dt_scale_odd_sizes"]) == {"distance", "dlog_a", "dB", "dC", "dD", "dw"}


@needs_triton
def test_fused_causal_conv_matches_float64_reference_in_the_interpreter() -> None:
    result = interpret(CONV)
    bad = {case: {k: v for k, v in errs.items() if not v < 1e-5} for case, errs in result.items()}
    assert not any(bad.values()), f"relative errors above 1e-5 (float32 vs float64): {bad}; all: {result}"
    assert set(result["bias"]) == {"y", "dx", "dw", "dbias"} and set(result["no_bias"]) == {"y", "dx", "dw"}
