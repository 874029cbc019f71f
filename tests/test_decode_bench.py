"""Smoke test of bench/decode.py in its CPU mode (no speed assertions)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


def bench_module(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_decode_bench_hybrid_static_step_cpu(capsys) -> None:
    """--hybrid keeps every (n // N)-th attention layer; --cuda-graph on CPU times the static step uncaptured."""
    module = bench_module("bench_decode_hybrid")
    assert module.kept_layers(30, 7) == [3, 7, 11, 15, 19, 23, 27] and module.kept_layers(4, 0) == []
    rows = module.main(["--cpu", "--teacher", "random:gpt2", "--contexts", "16", "--batches", "1,2",
                        "--steps", "2", "--warmup", "1", "--hybrid", "2", "--cuda-graph"])
    students = [r for r in rows if r["model"] == "student"]
    assert len(students) == 2 and not any("error" in r or "graph_error" in r for r in rows)
    assert all(r["graph_ms_per_token"] > 0 and r["graph_max_diff"] < 1e-4 for r in students)
    out = capsys.readouterr().out
    assert "attention kept in layers [1, 3]" in out and "| graph ms/token |" in out


@pytest.mark.slow  # torch.compile on CPU: 20-30 s with a cold inductor cache
def test_decode_bench_compile_side_by_side_cpu(capsys) -> None:
    module = bench_module("bench_decode_compile")
    rows = module.main(["--cpu", "--teacher", "random:llama", "--contexts", "16", "--batches", "1",
                        "--steps", "2", "--warmup", "1", "--hybrid", "1", "--compile"])
    student = next(r for r in rows if r["model"] == "student")
    assert "compiled_error" not in student and "graph_error" not in student, student
    assert student["compiled_max_diff"] < 1e-4 and student["graph_max_diff"] < 1e-4
    assert "| compiled ms/token |" in capsys.readouterr().out


def test_tuned_variant_counts_in_the_fair_ratio() -> None:
    module = bench_module("bench_decode_tuned")
    args = module.parse_args(["--cpu", "--tuned"])
    assert args.tuned and args.cuda_graph and not args.compile  # --tuned alone implies the graph columns
    shape = {"batch": 1, "context": 8, "tokens_per_s": 1.0}
    rows = [{"model": "teacher", **shape, "ms_per_token": 4.0},
            {"model": "student", **shape, "ms_per_token": 3.0, "graph_ms_per_token": 2.0, "graph_max_diff": 0.0,
             "tuned_ms_per_token": 0.8, "tuned_max_diff": 0.0}]
    assert module.fair_ratio(rows, 1, 8) == 4.0 / 0.8
    assert "| tuned ms/token |" in module.table(rows, args)
