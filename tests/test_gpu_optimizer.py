"""GPU: PyTorch's fused AdamW (``SURGERY_NEW_GPU_KERNELS=1``) trains the same weights as the multi-tensor path.

Skipped without CUDA; run on the GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from surgery.recipe import StageConfig
from verify.runner import build_optimizer

pytestmark = pytest.mark.gpu


def _train(cuda: torch.device, fused: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    monkeypatch.setenv("SURGERY_NEW_GPU_KERNELS", "1" if fused else "0")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.LayerNorm(96), torch.nn.Linear(96, 8)).to(cuda)
    opt = build_optimizer(list(model.parameters()), StageConfig(weight_decay=0.1, lr=1e-2))
    g = torch.Generator(device=cuda).manual_seed(1)
    for _ in range(6):
        opt.zero_grad()
        x = torch.randn(32, 64, device=cuda, generator=g)  # (batch, features), fresh each step
        model(x).pow(2).mean().backward()
        opt.step()
    return [p.detach().double() for p in model.parameters()], opt


def test_fused_adamw_matches_the_multi_tensor_path(cuda: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, ref_opt = _train(cuda, False, monkeypatch)
    got, opt = _train(cuda, True, monkeypatch)
    assert opt.defaults["fused"] and not ref_opt.defaults.get("fused")
    for r, p in zip(ref, got):
        assert not torch.equal(r, torch.zeros_like(r))
        assert (p - r).norm() / r.norm() < 1e-5
