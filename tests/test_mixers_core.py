"""Both mixers: SSM paths agree (float64), decode == full forward, padding, stage-1 parameters, gradients."""

from __future__ import annotations

import pytest
import torch

from surgery import ops
from surgery.cache import SSMCacheLayer
from surgery.mixers import get_mixer
from surgery.mixers.base import Mixer
from surgery.mixers.checks import decode_error, left_padding_error

D_MODEL = 16
TINY = {
    "discrete_mamba2": {"n_v_heads": 4, "n_qk_heads": 4, "n_b_heads": 2, "head_dim": 3, "d_state": 5, "chunk_size": 3},
    "mamba2": {"n_heads": 4, "head_dim": 3, "d_state": 5, "ngroups": 2, "chunk_size": 3},
}
MIXERS = sorted(TINY)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_mixer(name: str, seed: int = 0, **overrides: object) -> Mixer:
    """A float64 mixer with every parameter random (non-identity conv, closed-ish gate)."""
    cls = get_mixer(name)
    torch.manual_seed(seed)
    mixer = cls(D_MODEL, {**TINY[name], **overrides}, layer_idx=0).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.4)
    return mixer


def rand_u(b: int = 2, L: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, L, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive_y(mixer: Mixer, u: torch.Tensor) -> torch.Tensor:
    """The SSM part by the token-by-token recurrence."""
    x, _ = mixer._x_inputs(u, None)
    if mixer.name == "mamba2":
        dt, A, B, C, _ = mixer._matrix_inputs(u, None)
        log_a, x_in = ops.dt_to_decay(x, dt, A)
        y, _ = ops.ssd_naive(x_in, log_a, B, C)
        return y + x * mixer.D[:, None]
    log_a, B, C, _ = mixer._matrix_inputs(u, None)
    y, _ = ops.ssd_naive(x, log_a, B, C, D=mixer.D)
    return y


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("chunk_size", [3, 64])
def test_chunked_naive_and_matrix_paths_agree(name: str, chunk_size: int) -> None:
    mixer = tiny_mixer(name, chunk_size=chunk_size)
    u = rand_u()
    x, y = mixer.ssm_output(u)
    M = mixer.materialize(u)
    assert M.shape == (2, mixer.n_matrix_heads, 10, 10)
    assert rel(y, naive_y(mixer, u)) < 1e-10
    assert rel(torch.einsum("bhls,bshp->blhp", M, x), y) < 1e-10


@pytest.mark.parametrize("name", MIXERS)
def test_decode_steps_equal_full_forward(name: str) -> None:
    assert decode_error(tiny_mixer(name, seed=2), rand_u(L=12, seed=3)) < 1e-10


@pytest.mark.parametrize("name", MIXERS)
def test_left_padding_equals_unpadded(name: str) -> None:
    mixer = tiny_mixer(name, seed=4)
    u = rand_u(b=1, L=7, seed=5)
    pad = torch.randn(1, 4, D_MODEL, dtype=torch.float64) * 10  # garbage in the padding
    error, mask, slot_a, slot_b = left_padding_error(mixer, u, pad)
    assert error < 1e-10
    assert rel(slot_a.ssm_state, slot_b.ssm_state) < 1e-10
    step = rand_u(b=1, L=1, seed=6)
    assert rel(mixer.mix(step, cache=slot_a), mixer.mix(step, cache=slot_b)) < 1e-10
    M = mixer.materialize(torch.cat([pad, u], 1), mask)
    assert torch.all(M[..., :4] == 0)
    assert rel(M[..., 4:, 4:], mixer.materialize(u)) < 1e-10


@pytest.mark.parametrize("name", MIXERS)
def test_gradcheck(name: str) -> None:
    mixer = tiny_mixer(name, seed=7, chunk_size=2)
    u = rand_u(b=1, L=5, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(mixer.mix, (u,), fast_mode=True)
    assert torch.autograd.gradcheck(mixer.materialize, (u,), fast_mode=True)


@pytest.mark.parametrize("name", MIXERS)
def test_stage1_trains_only_matrix_parameters(name: str) -> None:
    mixer = tiny_mixer(name, seed=9)
    matrix = {id(p) for p in mixer.matrix_parameters()}
    assert len(matrix) == len(mixer.matrix_parameters())
    rest = [p for p in mixer.parameters() if id(p) not in matrix]
    assert rest and len(matrix) + len(rest) == len(list(mixer.parameters()))
    before = {n: p.detach().clone() for n, p in mixer.named_parameters()}
    opt = torch.optim.AdamW(mixer.matrix_parameters(), lr=1e-2, weight_decay=0.1)
    target = torch.rand(2, mixer.n_matrix_heads, 10, 10, dtype=torch.float64).tril()
    loss = (mixer.materialize(rand_u()) - target).pow(2).sum()
    loss.backward()
    assert all(p.grad is None for p in rest)  # the matrix does not depend on them
    opt.step()
    changed = {n for n, p in mixer.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in mixer.named_parameters() if id(p) in matrix}


@pytest.mark.parametrize("name", MIXERS)
def test_resolved_params_rebuild_the_mixer(name: str) -> None:
    mixer = tiny_mixer(name)
    rebuilt = get_mixer(name)(D_MODEL, mixer.params.model_dump(), layer_idx=3).double()
    rebuilt.load_state_dict(mixer.state_dict())  # strict: same parameter names and shapes
    u = rand_u()
    assert torch.equal(rebuilt.mix(u), mixer.mix(u))
    assert "layer_idx=3" in repr(rebuilt)


@pytest.mark.parametrize("name", MIXERS)
def test_no_conv_variant(name: str) -> None:
    mixer = tiny_mixer(name, d_conv=0)
    assert mixer.conv_x is None and mixer.conv_bc is None
    u = rand_u()
    slot = SSMCacheLayer()
    out = torch.cat([mixer.mix(u[:, :6], cache=slot), mixer.mix(u[:, 6:7], cache=slot)], 1)
    assert rel(out, mixer.mix(u[:, :7])) < 1e-10
    x, y = mixer.ssm_output(u)
    assert rel(torch.einsum("bhls,bshp->blhp", mixer.materialize(u), x), y) < 1e-10


def test_discrete_defaults_identity_conv_and_open_gate() -> None:
    cls = get_mixer("discrete_mamba2")
    mixer = cls(D_MODEL, TINY["discrete_mamba2"], layer_idx=0).double()
    record = mixer.init_from_attention(None, cls.init_model())
    assert record == {"conv_x, conv_bc": "identity", "z_proj, z_bias": "open gate (0, 1.2785)", "D": "1"}
    u = rand_u()
    x, _ = mixer.ssm_output(u)
    assert torch.allclose(x.reshape(2, 10, -1), mixer.x_proj(u))  # identity conv
    gate = torch.nn.functional.silu(mixer.z_proj(u) + mixer.z_bias)
    assert torch.allclose(gate, torch.ones_like(gate), atol=1e-4)
    assert torch.equal(mixer.D, torch.ones(4, dtype=torch.float64))


def test_mamba2_default_init_ranges() -> None:
    cls = get_mixer("mamba2")
    torch.manual_seed(0)
    mixer = cls(D_MODEL, TINY["mamba2"], layer_idx=0)
    record = mixer.init_from_attention(None, cls.init_model(dt_min=0.01, dt_max=0.02, A_init_min=2, A_init_max=3))
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert torch.all((dt > 0.0099) & (dt < 0.0201))
    assert torch.all((mixer.A_log.exp() >= 2) & (mixer.A_log.exp() <= 3))
    assert "dt_bias, A_log, D" in record
