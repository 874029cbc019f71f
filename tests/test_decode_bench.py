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


def test_static_decoder_matches_ordinary_decoding() -> None:
    """The buffer-in-place decode step that --cuda-graph captures gives the ordinary decode's logits (CPU, eager)."""
    import torch

    import surgery
    from surgery.teacher import load_teacher

    path = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    student, _ = surgery.rewrite(load_teacher("random:llama").model, [{"mixer": "discrete_mamba2"}])
    ids = torch.randint(4, 260, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        runs = []
        for static in (False, True):
            out = student(ids, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            dec = module.StaticDecoder(student, cache, nxt) if static else None
            logits = []
            for _ in range(4):
                if static:
                    logits.append(dec.step().clone())
                else:
                    step = student(nxt, past_key_values=cache, use_cache=True).logits
                    nxt = step[:, -1:].argmax(-1)
                    logits.append(step)
            runs.append(torch.cat(logits, 1))
        assert (runs[0] - runs[1]).abs().max().item() < 1e-5
        snap = dec.snapshot()  # restore() rewinds: the same step again gives the same logits
        first = dec.step().clone()
        dec.restore(snap)
        assert torch.equal(dec.step(), first)
