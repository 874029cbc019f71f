"""GPU: the fused stage-1 distance (Triton) and stage-3 loss against the plain-torch references.

Skipped without CUDA; run on the GPU machine. Tolerances are norm-relative errors against the
float64 reference on the same (rounded) inputs: float32 < 1e-3, bfloat16 < 2e-2.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest  # noqa: E402
import torch  # noqa: E402

from surgery.mixers.testing import naive_student  # noqa: E402
from surgery.ops.stage1 import MatrixFactors, matrix_squared_distance  # noqa: E402
from surgery.random_models import random_model  # noqa: E402
from verify.objective import replaced_nodes  # noqa: E402
from verify.stage3_logits import Distillation  # noqa: E402

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def stage1_inputs(device, b=2, h=9, hk=3, L=300, d=64, n=64, gB=3, w=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    q, k = r(b, h, L, d) * 0.5, r(b, hk, L, d) * 0.5
    t = {"log_a": -torch.rand(b, L, h, generator=g, device=device) * 0.5, "B": r(b, L, gB, n) * n**-0.5,
         "C": r(b, L, h, n) * n**-0.5, "D": r(h), "w": torch.rand(b, L, h, generator=g, device=device) if w else None}
    return q, k, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("L", "w"), [(300, False), (1000, True), (70, False)])
def test_fused_stage1_distance_matches_reference(cuda: torch.device, dtype: torch.dtype, L: int, w: bool) -> None:
    q, k, t = stage1_inputs(cuda, L=L, w=w)
    up = torch.randn(2, 9, device=cuda)

    def run(backend, dt):
        leaves = {n: (v.to(dt).clone().requires_grad_() if v is not None else None) for n, v in t.items()}
        value = matrix_squared_distance(q.to(dt), k.to(dt), 0.125, MatrixFactors(**leaves), backend=backend)
        (value * up.to(value.dtype)).sum().backward()
        return value.detach(), {n: v.grad for n, v in leaves.items() if v is not None}

    fast, ref = run("fused", dtype), run("reference", torch.float64)
    errors = {"distance": rel(fast[0], ref[0])} | {f"d{n}": rel(fast[1][n], ref[1][n]) for n in fast[1]}
    bad = {n: e for n, e in errors.items() if not e < TOL[dtype]}
    assert not bad, f"{dtype} L={L}: {bad} (all {errors})"


def test_fused_stage1_distance_in_batch_slices(cuda: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose grid exceeds the launch limit runs in slices, with the reference's value and gradients."""
    from surgery.ops import launch_limits

    q, k, t = stage1_inputs(cuda, b=5, L=130, w=True, seed=3)
    monkeypatch.setattr(launch_limits, "GRID_Y_MAX", 2 * 9)  # two rows of 9 heads per launch: slices 2, 2, 1
    up = torch.randn(5, 9, device=cuda)

    def run(backend, dt):
        leaves = {n: v.to(dt).clone().requires_grad_() for n, v in t.items()}
        value = matrix_squared_distance(q.to(dt), k.to(dt), 0.125, MatrixFactors(**leaves), backend=backend)
        (value * up.to(value.dtype)).sum().backward()
        return value.detach(), {n: v.grad for n, v in leaves.items()}

    fast, ref = run("fused", torch.float32), run("reference", torch.float64)
    errors = {"distance": rel(fast[0], ref[0])} | {f"d{n}": rel(fast[1][n], ref[1][n]) for n in fast[1]}
    assert all(e < TOL[torch.float32] for e in errors.values()), errors


def test_fused_stage1_long_sequence_fits_in_little_memory(cuda: torch.device) -> None:
    q, k, t = stage1_inputs(cuda, b=1, L=16384, seed=1)
    q, k = q.bfloat16(), k.bfloat16()
    leaves = {n: (v.bfloat16().requires_grad_() if v is not None else None) for n, v in t.items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    value = matrix_squared_distance(q, k, 0.125, MatrixFactors(**leaves))
    value.sum().backward()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    assert torch.isfinite(value).all() and all(torch.isfinite(v.grad).all() for v in leaves.values() if v is not None)
    assert extra < 1.0, f"stage-1 loss at L=16384 used {extra:.2f} GiB beyond its inputs"  # L x L bf16 x 9 heads = 4.5 GiB


@pytest.mark.parametrize("new_kernels", ["0", "1"])
def test_stage3_fused_matches_full_logits_under_bf16(cuda: torch.device, new_kernels: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGERY_NEW_GPU_KERNELS", new_kernels)  # the compiled chunk terms, and without them
    teacher = random_model("llama").to(cuda).eval()
    ids = torch.randint(3, 300, (4, 64), device=cuda)
    out = {}
    for fused in (True, False):
        student = naive_student(teacher).eval()
        objective = Distillation(teacher, student, replaced_nodes(student), temperature=2.0, ce_weight=0.5)
        objective.fused = fused
        objective.freeze_others()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            metrics = objective.train_step(ids, 1.0)
        out[fused] = (metrics["loss"].item(), {n: p.grad.float() for n, p in student.named_parameters() if p.grad is not None})
    assert out[True][0] == pytest.approx(out[False][0], rel=2e-2)
    assert all(rel(out[True][1][n], out[False][1][n]) < 5e-2 for n in out[True][1])


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_fused_distill_loss_compiled_on_cuda_matches_float64(cuda: torch.device, ce_weight: float,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunk terms run compiled on CUDA (float32 here): loss and every gradient against full float64 logits."""
    import torch.nn.functional as F

    monkeypatch.setenv("SURGERY_NEW_GPU_KERNELS", "1")  # opt-in until this test has passed on a GPU
    from surgery.ops.distill_loss import fused_distill_loss

    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=cuda).manual_seed(5)
    N, d, V, T = 300, 64, 1000, 2.0
    hs, Ws, bs = (torch.randn(*s, generator=g, device=cuda) for s in ((N, d), (V, d), (V,)))
    ht, Wt = torch.randn(N, d, generator=g, device=cuda), torch.randn(V, d, generator=g, device=cuda)
    y = torch.randint(0, V, (N,), generator=g, device=cuda)
    y[-5:] = -1
    leaves = [t.clone().requires_grad_() for t in (hs, Ws, bs)]
    loss, _, _ = fused_distill_loss(*leaves, ht, Wt, None, y, temperature=T, kl_weight=0.7, ce_weight=ce_weight, chunk=128)
    got = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.double().requires_grad_() for t in (hs, Ws, bs)]
    s, z = F.linear(*ref_leaves), F.linear(ht.double(), Wt.double())
    lt, ls = F.log_softmax(z / T, -1), F.log_softmax(s / T, -1)
    ref = 0.7 * T**2 * (lt.exp() * (lt - ls)).sum(-1).mean()
    if ce_weight:
        ref = ref + ce_weight * F.cross_entropy(s[y >= 0], y[y >= 0])
    want = torch.autograd.grad(ref, ref_leaves)
    assert rel(loss, ref) < 1e-4
    assert all(rel(a, b) < 1e-3 for a, b in zip(got, want)), [rel(a, b) for a, b in zip(got, want)]


@pytest.mark.xfail(strict=True, reason=(
    "known: on an H100 (2026-12-07) each stage's micro-step still synchronised after the mixers' own read was "
    "removed. Likely cause, from transformers' code (not yet confirmed on a GPU): every forward without an "
    "attention mask or cache runs masking_utils.find_packed_sequence_indices, whose `(...).all()` reads the "
    "device once per model call (teacher and student). strict: this test says so once it is fixed"))
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_training_micro_step_never_waits_for_the_device(cuda: torch.device, stage: int) -> None:
    """Inside the runner's context (autocast, fresh_sequences) a micro-step queues kernels and reads nothing back:
    CUDA's sync debug mode raises on any synchronising call (``.item()``, ``int(tensor)``, a device-to-host copy)."""
    from surgery.cache import fresh_sequences
    from verify.stage1_matrix import MatrixOrientation
    from verify.stage2_hidden import HiddenStateAlignment

    teacher = random_model("llama").to(cuda).eval()
    student = naive_student(teacher).eval()
    nodes = replaced_nodes(student)
    make = {1: MatrixOrientation, 2: HiddenStateAlignment, 3: Distillation}[stage]
    objective = make(teacher, student, nodes)
    objective.freeze_others()
    ids = torch.randint(3, 300, (2, 64), device=cuda)
    with torch.autocast("cuda", dtype=torch.bfloat16), fresh_sequences():
        objective.train_step(ids, 1.0)  # the first step may decide paths (one probe read); later ones may not read
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            metrics = objective.train_step(ids, 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.as_tensor(metrics["loss"])).all()
