"""Smoke test of bench/decode.py in its CPU mode (no speed assertions)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_decode_bench_cpu_smoke(capsys) -> None:
    path = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--cpu", "--teacher", "random:llama", "--contexts", "16,48", "--batches", "1,2",
                        "--steps", "2", "--warmup", "1"])
    assert len(rows) == 8 and not any("error" in r for r in rows)
    assert {r["cache"] for r in rows if r["model"] == "student"} == {"SurgeryCache"}
    state = {(r["model"], r["batch"], r["context"]): r["state_bytes"] for r in rows}
    for b in (1, 2):
        assert state[("student", b, 16)] == state[("student", b, 48)] > 0  # constant in the context
        assert state[("teacher", b, 48)] > state[("teacher", b, 16)]  # the KV cache grows
    assert state[("student", 2, 16)] == 2 * state[("student", 1, 16)]
    out = capsys.readouterr().out
    assert "| model | batch | context |" in out and "vs teacher" in out


def test_decode_bench_fair_baseline_cpu(capsys) -> None:
    path = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode_fair", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--cpu", "--teacher", "random:llama", "--contexts", "16", "--batches", "1",
                        "--steps", "2", "--warmup", "1", "--fair"])
    assert [r["model"] for r in rows] == ["teacher", "student", "teacher static"]
    assert not any("error" in r for r in rows) and rows[2]["ms_per_token"] > 0
    best_teacher = min(rows[0]["ms_per_token"], rows[2]["ms_per_token"])
    assert rows[1]["vs_teacher_best"] == best_teacher / rows[1]["ms_per_token"]
    assert "vs teacher best" in capsys.readouterr().out


def test_prefill_is_timed_after_an_untimed_one() -> None:
    """The timed prefill is not the shape's first call (which compiles / autotunes the kernels on CUDA)."""
    import argparse

    import torch

    from surgery.random_models import random_model

    path = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode_warm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = random_model("llama")
    lengths: list[int] = []

    def record(_module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        lengths.append(ids.shape[1])

    model.register_forward_pre_hook(record, with_kwargs=True)
    for warmup, prefills in ((1, 2), (0, 1)):
        lengths.clear()
        ns = argparse.Namespace(device=torch.device("cpu"), warmup=warmup, steps=2, cuda_graph=False)
        row = module.measure(model, 1, 24, ns)
        assert lengths.count(24) == prefills and lengths.count(1) == warmup + 2
        assert row["prefill_ms"] > 0
