"""Smoke test of bench/mixers.py (tiny CPU mode; no speed assertions)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_bench_quick_runs(capsys) -> None:
    path = Path(__file__).resolve().parents[1] / "bench" / "mixers.py"
    spec = importlib.util.spec_from_file_location("bench_mixers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick"])
    assert {r[1] for r in rows} == {"ssd reference", "sdpa causal", "stage1 materialised"}
    assert all("Error" not in cell for r in rows for cell in r)
    assert "fwd+bwd ms" in capsys.readouterr().out
