"""Smoke test of bench/train.py (tiny CPU mode; no speed assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path


def load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_bench_cpu_smoke(capsys) -> None:
    rows = load_bench().main(["--cpu-smoke"])
    assert [(r["stage"], r["path"]) for r in rows] == [(s, p) for s in (1, 2, 3) for p in ("plain", "fast")]
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| 3 | fast |" in out and "fast / plain" in out


def test_train_bench_profile_writes_a_summary_and_a_trace(tmp_path, capsys) -> None:
    load_bench().main(["--cpu-smoke", "--stages", "3", "--paths", "fast", "--profile", str(tmp_path)])
    out_dir = tmp_path / "stage3-fast"
    summary = (out_dir / "summary.txt").read_text()
    assert summary.startswith("# stage3-fast\nstep wall ")
    assert "| kind | ms | share of busy | launches |" in summary
    assert json.loads((out_dir / "trace.json").read_text())["traceEvents"]  # a Chrome trace with events
    assert "step wall" in capsys.readouterr().out


def test_kernel_kinds_and_summary_from_named_events() -> None:
    from importlib import import_module
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    step_profile = import_module("step_profile")
    assert step_profile.kind_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert step_profile.kind_of("_bwd_chunk") == "triton"  # a bare identifier: a Triton kernel
    assert step_profile.kind_of("triton_poi_fused_add_mul_0") == "triton"
    assert step_profile.kind_of("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT") == "matmul"
    assert step_profile.kind_of("sm90_xmma_fprop_implicit_gemm_bf16") == "convolution"
    assert step_profile.kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert step_profile.kind_of("_conv_bwd") == "triton"  # the fused conv is ours, a Triton kernel
    assert step_profile.kind_of("void at::native::vectorized_elementwise_kernel<4>") == "element-wise"
    assert step_profile.kind_of("void foo::bar<int>(int)") == "other"
    text = step_profile.summarise(0.010, [("ampere_bf16_gemm", 3000.0, 2), ("vectorized_elementwise_kernel", 1000.0, 8)])
    assert text.splitlines()[0] == "step wall 10.0 ms; device busy 4.0 ms (40% of wall); 10 kernel launches"
    assert "| matmul | 3.00 | 75.0% | 2 |" in text and "| element-wise | 1.00 | 25.0% | 8 |" in text
