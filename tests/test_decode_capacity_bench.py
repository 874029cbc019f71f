"""Smoke tests of bench/decode_capacity.py on CPU (no speed or memory assertions about a device)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch


def capacity_module() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "decode_capacity.py"
    spec = importlib.util.spec_from_file_location("bench_decode_capacity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_capacity_cpu_smoke_prefills_in_pieces(tmp_path, capsys) -> None:
    rows_file = tmp_path / "rows.jsonl"
    rows = capacity_module().main(["--cpu", "--teacher", "random:llama", "--contexts", "16,64", "--max-batch", "2",
                                   "--chunk", "24", "--student-prompt", "8", "--steps", "1",
                                   "--jsonl", str(rows_file)])
    assert [(r["model"], r["context"]) for r in rows] == [("teacher", 16), ("student", 16), ("teacher", 64), ("student", 64)]
    assert all(r["largest_batch"] == 2 and r["reached_max_batch"] for r in rows)
    by = {(r["model"], r["context"]): r for r in rows}
    per_token = [by[("teacher", L)]["cache_bytes"] / (L + 2) for L in (16, 64)]  # + one untimed, one timed step
    assert per_token[0] == per_token[1] > 0  # the KV cache grows with the context, 64 tokens over 3 pieces
    assert by[("student", 64)]["prompt"] == 8 and by[("student", 64)]["cache_bytes"] == by[("student", 16)]["cache_bytes"]
    assert [json.loads(line)["model"] for line in rows_file.read_text().splitlines()] == ["teacher", "student"] * 2
    assert "| model | context | prompt tokens | largest batch |" in capsys.readouterr().out


def test_capacity_stops_at_the_first_batch_out_of_memory(monkeypatch) -> None:
    module = capacity_module()
    tried: list[int] = []

    def fake_trial(model, batch, prompt, args, bench):
        tried.append(batch)
        if batch >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"cache_bytes": batch * 10, "ms_per_token": 1.0, "tokens_per_s": batch * 1e3}

    monkeypatch.setattr(module, "trial", fake_trial)
    args = module.parse_args(["--cpu", "--max-batch", "64"])
    row = module.largest_batch("teacher", None, 128, args, None)
    assert tried == [1, 2, 4, 8]
    assert row["largest_batch"] == 4 and row["failed_batch"] == 8 and row["out_of_memory"] and row["cache_bytes"] == 40
    assert not row["reached_max_batch"]
    assert "8: out of memory" in module.table([row], argparse_namespace(module))


@pytest.mark.parametrize(("oom_from", "tried", "largest"), [
    (48, [1, 64, 32], 32),           # the jump overshoots: halve until a batch runs
    (256, [1, 64, 128, 256], 128),   # the jump fits: double from there
    (1, [1], 0),                     # not even one sequence fits
])
def test_capacity_jumps_to_what_free_memory_allows(monkeypatch, oom_from: int, tried: list[int], largest: int) -> None:
    module = capacity_module()
    seen: list[int] = []

    def fake_trial(model, batch, prompt, args, bench):
        seen.append(batch)
        if batch >= oom_from:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"cache_bytes": batch * 10, "ms_per_token": 1.0, "tokens_per_s": batch * 1e3}

    monkeypatch.setattr(module, "trial", fake_trial)
    monkeypatch.setattr(module, "free_bytes", lambda device: 1000)  # 80% of it holds 80 caches of 10 bytes: jump to 64
    args = module.parse_args(["--cpu", "--max-batch", "4096"])
    row = module.largest_batch("teacher", None, 128, args, None)
    assert seen == tried
    assert row["largest_batch"] == largest
    assert row["failed_batch"] == min(b for b in tried if b >= oom_from)


def test_capacity_without_jump_doubles_from_one(monkeypatch) -> None:
    module = capacity_module()
    monkeypatch.setattr(module, "free_bytes", lambda device: 10**12)
    args = module.parse_args(["--cpu", "--no-jump", "--max-batch", "64"])
    assert module.jump_target(10, args) == 2
    args.jump = True
    assert module.jump_target(10, args) == 64  # capped by --max-batch
    assert module.jump_target(0, args) == 2


def argparse_namespace(module: ModuleType):
    args = module.parse_args(["--cpu"])
    args.dtype = "float32"
    return args


@pytest.mark.parametrize("bad", [["--chunk", "0"], ["--max-batch", "0"], ["--student-prompt", "-1"]])
def test_capacity_refuses_bad_numbers(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        capacity_module().parse_args(["--cpu", *bad])
