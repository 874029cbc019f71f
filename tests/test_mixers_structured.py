"""The structured mixers of MOHAWK's ablation (toeplitz, low_rank, semiseparable), in float64.

Each: forward == materialised matrix times x == the token-by-token definition, decoding == full
forward, left padding == unpadded, gradients (gradcheck), stage 1 trains only the matrix parameters.
"""

from __future__ import annotations

import pytest
import torch

from surgery.mixers import get_mixer
from surgery.mixers.base import Mixer
from surgery.mixers.checks import decode_error, left_padding_error
from surgery.ops.structured import gla_naive
from surgery.ops.stage1 import attention_probs, matrix_squared_distance

D_MODEL = 16
TINY = {
    "toeplitz": {"n_heads": 4, "head_dim": 3, "kernel_size": 6},
    "low_rank": {"n_heads": 4, "n_b_heads": 2, "head_dim": 3, "rank": 5, "chunk_size": 3},
    "low_rank_plain": {"n_heads": 4, "n_b_heads": 2, "head_dim": 3, "rank": 5, "chunk_size": 3,
                       "feature_map": "identity", "normalize": False},
    "semiseparable": {"n_heads": 4, "n_b_heads": 2, "head_dim": 3, "d_state": 5, "chunk_size": 3},
}
CASES = sorted(TINY)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_mixer(case: str, seed: int = 0, **overrides: object) -> Mixer:
    """A float64 mixer with every parameter random (closed-ish gate, rough kernel)."""
    cls = get_mixer(case.removesuffix("_plain"))
    torch.manual_seed(seed)
    mixer = cls(D_MODEL, {**TINY[case], **overrides}, layer_idx=0).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.4)
    return mixer


def rand_u(b: int = 2, L: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, L, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive_y(mixer: Mixer, u: torch.Tensor) -> torch.Tensor:
    """``y = M x`` by each family's definition, token by token."""
    x = mixer.x_inputs(u, None)  # (b, L, h, p)
    b, L, h, p = x.shape
    if mixer.name == "toeplitz":
        k = mixer.kernel  # (h, K)
        y = torch.zeros_like(x)
        for t in range(L):
            for j in range(min(t + 1, k.shape[1])):
                y[:, t] += k[:, j, None] * x[:, t - j]
        return y
    if mixer.name == "semiseparable":
        return gla_naive(x, *mixer.matrix_inputs(u, None))[0]
    B, C = mixer.features(u, None)  # low_rank: (b, L, n_b, r), (b, L, h, r)
    B = B.repeat_interleave(h // B.shape[2], dim=2)
    H = x.new_zeros(b, h, p, B.shape[-1])
    z = x.new_zeros(b, h, B.shape[-1])
    ys = []
    for t in range(L):
        H = H + x[:, t, :, :, None] * B[:, t, :, None, :]
        z = z + B[:, t]
        num = torch.einsum("bhpr,bhr->bhp", H, C[:, t])
        ys.append(num / (torch.einsum("bhr,bhr->bh", z, C[:, t])[..., None] + mixer.params.eps)
                  if mixer.params.normalize else num)
    return torch.stack(ys, 1)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_size", [3, 64])
def test_forward_matrix_and_definition_agree(case: str, chunk_size: int) -> None:
    extra = {} if case == "toeplitz" else {"chunk_size": chunk_size}
    mixer = tiny_mixer(case, **extra)
    u = rand_u()
    x, y = mixer.ssm_output(u)
    M = mixer.materialize(u)
    assert M.shape == (2, 4, 10, 10)
    assert torch.all(M.triu(1) == 0)  # causal
    assert rel(y, naive_y(mixer, u)) < 1e-10
    assert rel(torch.einsum("bhls,bshp->blhp", M, x), y) < 1e-10


@pytest.mark.parametrize("case", CASES)
def test_decode_steps_equal_full_forward(case: str) -> None:
    assert decode_error(tiny_mixer(case, seed=2), rand_u(L=12, seed=3)) < 1e-10


@pytest.mark.parametrize("case", CASES)
def test_left_padding_equals_unpadded(case: str) -> None:
    mixer = tiny_mixer(case, seed=4)
    u = rand_u(b=1, L=7, seed=5)
    pad = torch.randn(1, 4, D_MODEL, dtype=torch.float64) * 10  # garbage in the padding
    error, mask, slot_a, slot_b = left_padding_error(mixer, u, pad)
    assert error < 1e-10
    step = rand_u(b=1, L=1, seed=6)
    assert rel(mixer.mix(step, cache=slot_a), mixer.mix(step, cache=slot_b)) < 1e-10
    M = mixer.materialize(torch.cat([pad, u], 1), mask)
    assert torch.all(M[..., :4] == 0)
    assert rel(M[..., 4:, 4:], mixer.materialize(u)) < 1e-10


@pytest.mark.parametrize("case", CASES)
def test_gradcheck(case: str) -> None:
    mixer = tiny_mixer(case, seed=7, **({} if case == "toeplitz" else {"chunk_size": 2}))
    u = rand_u(b=1, L=5, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(mixer.mix, (u,), fast_mode=True)
    assert torch.autograd.gradcheck(mixer.materialize, (u,), fast_mode=True)
    kernel_or_C = mixer.matrix_parameters()[0]
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(
        mixer, {n: (w if p is kernel_or_C else p) for n, p in mixer.named_parameters()}, (u.detach(),))[0], (kernel_or_C,),
        fast_mode=True)


@pytest.mark.parametrize("case", CASES)
def test_stage1_trains_only_matrix_parameters(case: str) -> None:
    mixer = tiny_mixer(case, seed=9)
    matrix = {id(p) for p in mixer.matrix_parameters()}
    rest = [p for p in mixer.parameters() if id(p) not in matrix]
    assert rest and len(matrix) + len(rest) == len(list(mixer.parameters()))
    before = {n: p.detach().clone() for n, p in mixer.named_parameters()}
    opt = torch.optim.AdamW(mixer.matrix_parameters(), lr=1e-2, weight_decay=0.1)
    target = torch.rand(2, 4, 10, 10, dtype=torch.float64).tril()
    loss = (mixer.materialize(rand_u()) - target).pow(2).sum()
    loss.backward()
    assert all(p.grad is None for p in rest)
    opt.step()
    changed = {n for n, p in mixer.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in mixer.named_parameters() if id(p) in matrix}


@pytest.mark.parametrize("case", CASES)
def test_resolved_params_rebuild_the_mixer(case: str) -> None:
    mixer = tiny_mixer(case)
    rebuilt = get_mixer(mixer.name)(D_MODEL, mixer.params.model_dump(), layer_idx=3).double()
    rebuilt.load_state_dict(mixer.state_dict())
    u = rand_u()
    assert torch.equal(rebuilt.mix(u), mixer.mix(u))
    assert "layer_idx=3" in repr(rebuilt)


def test_toeplitz_kernel_shorter_than_the_sequence() -> None:
    mixer = tiny_mixer("toeplitz", kernel_size=3)
    u = rand_u(L=9)
    M = mixer.materialize(u)[0, 0]
    lag = torch.arange(9)[:, None] - torch.arange(9)[None, :]
    assert torch.all(M[lag >= 3] == 0) and torch.all(M[(lag >= 0) & (lag < 3)] != 0)
    assert torch.equal(torch.diagonal(M, -2), mixer.kernel[0, 2].expand(7))  # constant diagonals
    x, y = mixer.ssm_output(u)
    assert rel(y, naive_y(mixer, u)) < 1e-10


def test_toeplitz_default_init_is_a_causal_average() -> None:
    cls = get_mixer("toeplitz")
    mixer = cls(D_MODEL, {"n_heads": 2, "head_dim": 3, "kernel_size": 32}, layer_idx=0).double()
    record = mixer.init_from_attention(None, cls.init_model(init_length=4.0))
    assert record["kernel"] == "exp(-j/4), sum 1"
    assert torch.allclose(mixer.kernel.sum(-1), torch.ones(2, dtype=torch.float64))
    assert torch.all(mixer.kernel[:, 1:] < mixer.kernel[:, :-1])


def test_low_rank_normalised_rows_sum_to_one_and_feature_maps() -> None:
    for fmap in ("elu1", "relu", "softplus"):
        mixer = tiny_mixer("low_rank", feature_map=fmap)
        M = mixer.materialize(rand_u())
        assert torch.all(M >= 0)
        sums = M.sum(-1)
        if fmap == "relu":  # a row whose features relu zeroes stays zero
            sums = sums[sums > 0.5]
        assert sums.numel() > 10 and rel(sums, torch.ones_like(sums)) < 1e-4  # up to eps over small row sums
    with pytest.raises(ValueError, match="positive feature_map"):
        get_mixer("low_rank").params_model(feature_map="identity", normalize=True)


def test_low_rank_factored_stage1_distance_equals_materialised() -> None:
    plain, normed = tiny_mixer("low_rank_plain"), tiny_mixer("low_rank")
    assert plain.has_matrix_factors() and not normed.has_matrix_factors()
    assert not tiny_mixer("toeplitz").has_matrix_factors() and not tiny_mixer("semiseparable").has_matrix_factors()
    u = rand_u()
    q, k = torch.randn(2, 4, 10, 6, dtype=torch.float64), torch.randn(2, 2, 10, 6, dtype=torch.float64)
    squared = matrix_squared_distance(q, k, 0.4, plain.matrix_factors(u), backend="reference")
    direct = (plain.materialize(u) - attention_probs(q, k, 0.4)).pow(2).sum((-1, -2))
    assert rel(squared, direct) < 1e-12
