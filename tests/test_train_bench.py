"""Smoke test of bench/train.py (tiny CPU mode; no speed assertions)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path


def test_train_bench_cpu_smoke(capsys) -> None:
    path = Path(__file__).resolve().parents[1] / "bench" / "train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--cpu-smoke"])
    assert [(r["stage"], r["path"]) for r in rows] == [(s, p) for s in (1, 2, 3) for p in ("plain", "fast")]
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| 3 | fast |" in out and "fast / plain" in out
