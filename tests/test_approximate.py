"""``surgery approximate``: the per-family fits (MOHAWK Table 3) and the study on a tiny random teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery.approximate.fit import (
    fit_all,
    fit_gradient,
    fit_toeplitz,
    frobenius,
    matrix,
    semiseparable_fast,
    svd_init,
)
from surgery.approximate.study import (
    choose_heads,
    markdown,
    parse_families,
    parse_layers,
    parse_ranks,
    run_study,
    write,
)
from surgery.ops.ssd_reference import ssd_matrix
from surgery.ops.structured import gla_matrix, toeplitz_matrix
from surgery.options import ApproximateOptions

ROOT = Path(__file__).resolve().parents[1]


def softmax_attention(N: int, L: int, seed: int = 0) -> torch.Tensor:
    """Random causal softmax matrices (N, L, L), float64, peaked like real attention."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(N, L, L, generator=g, dtype=torch.float64) * 3
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def test_toeplitz_fit_is_exact_on_toeplitz_and_optimal() -> None:
    kernel = torch.randn(3, 12, dtype=torch.float64)
    P = toeplitz_matrix(kernel, 12)  # (3, 12, 12), exactly Toeplitz
    assert frobenius(torch.zeros_like(P), P).min() > 1  # not a trivial target
    assert fit_toeplitz(P).distance.max() < 1e-12
    A = softmax_attention(2, 12)
    best = fit_toeplitz(A).distance
    for _ in range(5):  # any other kernel is farther (the diagonal means are the least-squares optimum)
        other = toeplitz_matrix(torch.randn(1, 12, dtype=torch.float64) * 0.1 + 0.05, 12).expand(2, -1, -1)
        assert torch.all(frobenius(other, A) > best)


def test_semiseparable_fast_matches_the_stable_reference() -> None:
    g = torch.Generator().manual_seed(1)
    N, L, r = 2, 37, 5  # L not a multiple of the chunk
    log_a = -5 * torch.rand(N, L, r, generator=g, dtype=torch.float64)
    B, C = (torch.randn(N, L, r, generator=g, dtype=torch.float64) for _ in range(2))
    ref = gla_matrix(log_a[:, :, None], B[:, :, None], C[:, :, None], chunk_size=8)[:, 0]
    fast = semiseparable_fast(log_a, B, C)
    assert ((fast - ref).norm() / ref.norm()).item() < 1e-12


def test_family_matrices_reduce_to_each_other() -> None:
    g = torch.Generator().manual_seed(2)
    N, L, r = 2, 20, 4
    Q, K = (torch.randn(N, L, r, generator=g, dtype=torch.float64) for _ in range(2))
    low = matrix("low_rank", Q, K, None)
    assert torch.allclose(matrix("ssd", Q, K, torch.zeros(N, L, dtype=torch.float64)), low)
    shared = -torch.rand(N, L, generator=g, dtype=torch.float64)
    ssd = matrix("ssd", Q, K, shared)
    assert torch.allclose(matrix("semiseparable", Q, K, shared[..., None].expand(N, L, r)), ssd)
    assert torch.allclose(ssd, ssd_matrix(shared[..., None], K[:, :, None], Q[:, :, None])[:, 0])


def test_fits_respect_the_nesting_and_improve_on_svd() -> None:
    P = softmax_attention(3, 24)
    fits = {f.family: f for f in fit_all(P, [4], steps=40, lr=1e-2)}
    Q, K = svd_init(P, 4)
    svd = frobenius(matrix("low_rank", Q, K, None), P)
    assert torch.all(fits["toeplitz"].distance > fits["low_rank"].distance)
    assert torch.all(fits["low_rank"].distance < svd)  # the gradient steps helped
    assert torch.all(fits["ssd"].distance <= fits["low_rank"].distance)
    assert torch.all(fits["semiseparable"].distance <= fits["ssd"].distance)
    assert all(fits[f].rank == 4 for f in ("low_rank", "ssd", "semiseparable"))


def test_ssd_fits_a_decaying_matrix_far_better_than_low_rank() -> None:
    g = torch.Generator().manual_seed(3)
    N, L, r = 2, 32, 2
    B, C = (torch.randn(N, L, r, generator=g, dtype=torch.float64) for _ in range(2))
    log_a = torch.full((N, L), -0.7, dtype=torch.float64)  # a strong decay: far from low rank
    P = matrix("ssd", C, B, log_a)
    low = fit_gradient("low_rank", P, r, None, 60, 1e-2)
    ssd = fit_gradient("ssd", P, r, low, 200, 3e-2)
    assert ssd.distance.mean() < 0.5 * low.distance.mean()


def test_option_parsing_errors_name_the_flag() -> None:
    assert parse_ranks("16, 32,64") == [16, 32, 64]
    with pytest.raises(ValueError, match="--ranks"):
        parse_ranks("16,-2")
    assert parse_families("ssd,toeplitz") == ("ssd", "toeplitz")
    with pytest.raises(ValueError, match="--families"):
        parse_families("ssd,hyena")
    heads = choose_heads(5, 4, "2", seed=0)
    assert len(heads) == 5 and all(len(h) == 2 and len(set(h)) == 2 and max(h) < 4 for h in heads)
    assert heads == choose_heads(5, 4, "2", seed=0) and choose_heads(2, 3, "all", 0) == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(ValueError, match="--heads-per-layer"):
        choose_heads(2, 3, "4", 0)
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("2,0", 3) == [2, 0]
    for bad in ("3", "0,x", ""):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad, 3)


def test_study_on_a_tiny_random_teacher(tmp_path: Path) -> None:
    opts = ApproximateOptions(teacher="random:llama", data="builtin:python-docs", seq_len=32, samples=2,
                              heads_per_layer="2", ranks="2,4", steps=5, out=str(tmp_path))
    result = run_study(opts, progress=False)
    assert result["matrices"] == 2 * 4 * 2  # samples x layers x heads
    keys = {"toeplitz", "low_rank@2", "low_rank@4", "ssd@2", "ssd@4", "semiseparable@2", "semiseparable@4"}
    assert set(result["mean"]) == keys and set(result["per_layer"]) == keys
    assert all(set(v) == {"0", "1", "2", "3"} for v in result["per_layer"].values())
    for r in (2, 4):
        assert result["mean"]["toeplitz"] > result["mean"][f"low_rank@{r}"] >= result["mean"][f"semiseparable@{r}"]
    paths = write(result, tmp_path)
    assert json.loads(paths["json"].read_text())["mean"] == result["mean"]
    md = paths["md"].read_text()
    assert md == markdown(result) and "| semiseparable |" in md and "Per layer, rank/state 4" in md
    assert paths["png"].stat().st_size > 10_000


def test_samples_fitted_together_give_the_per_sample_result(tmp_path: Path) -> None:
    """Fitting several sequences' matrices as one batch (the CUDA default) changes nothing but speed."""
    common = {"teacher": "random:llama", "data": "builtin:python-docs", "seq_len": 32, "samples": 3,
              "heads_per_layer": "2", "ranks": "4", "steps": 8, "out": str(tmp_path)}
    one = run_study(ApproximateOptions(**common, samples_per_fit=1), progress=False)
    together = run_study(ApproximateOptions(**common, samples_per_fit=3), progress=False)
    assert set(one["mean"]) == set(together["mean"])
    for key, value in one["mean"].items():
        assert together["mean"][key] == pytest.approx(value, rel=1e-4), key
        for layer, v in one["per_layer"][key].items():
            assert together["per_layer"][key][layer] == pytest.approx(v, rel=1e-4), (key, layer)


def test_cli_runs_and_prints_the_table(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["approximate", "--teacher", "random:llama", "--data", "builtin:python-docs", "--seq-len", "24",
            "--ranks", "2", "--steps", "2", "--families", "toeplitz,ssd", "--layers", "0,3", "-o", str(tmp_path), "-q"]
    done = subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| ssd | " in done.stdout and "| toeplitz (no rank) |" in done.stdout
    assert (tmp_path / "approximate.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "surgery", *args[:-3], "--ranks", "0"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and "--ranks" in bad.stderr
