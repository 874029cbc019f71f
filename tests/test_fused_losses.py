"""Stage-1 distance from factors and stage-3 loss fused with the LM heads equal the materialised losses.

The fast paths change how the losses are computed, never what they are: each is checked here
against the direct computation (values and gradients) on CPU; the Triton versions are checked
against the same references on the GPU (tests/test_gpu_losses.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from surgery.mixers.testing import naive_student
from surgery.ops.distill_loss import fused_distill_loss
from surgery.ops.stage1 import MatrixFactors, attention_probs, matrix_squared_distance
from surgery.random_models import random_model
from verify.capture import eager_attention, record_attention_qk, run_teacher
from verify.objective import replaced_nodes
from verify.stage1_matrix import MatrixOrientation, node_distance
from verify.stage3_logits import Distillation, heads_are_plain

pytestmark = pytest.mark.hf_contract  # records attention through transformers' AttentionInterface
F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_matrix_squared_distance_is_the_frobenius_formula() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, hk, L, d, n = 2, 4, 2, 9, 5, 3
    q, k = torch.randn(b, h, L, d, generator=g, dtype=F64), torch.randn(b, hk, L, d, generator=g, dtype=F64)
    f = MatrixFactors(-torch.rand(b, L, h, generator=g, dtype=F64), torch.randn(b, L, 2, n, generator=g, dtype=F64),
                      torch.randn(b, L, h, n, generator=g, dtype=F64), D=torch.randn(h, generator=g, dtype=F64),
                      w=torch.rand(b, L, h, generator=g, dtype=F64))
    got = matrix_squared_distance(q, k, 0.3, f)
    # the formula, entry by entry for one (batch, head)
    bi, hi = 1, 3
    z = (q[bi, hi] @ k[bi, hi // 2].T) * 0.3
    P = torch.softmax(z.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")), -1)
    M = torch.zeros(L, L, dtype=F64)
    for l in range(L):
        for s in range(l + 1):
            decay = f.log_a[bi, s + 1 : l + 1, hi].sum().exp()
            M[l, s] = (f.C[bi, l, hi] @ f.B[bi, s, hi // 2]) * decay * f.w[bi, s, hi] + (f.D[hi] if l == s else 0)
    assert got.shape == (b, h)
    assert abs(got[bi, hi].item() - ((M - P) ** 2).sum().item()) < 1e-10
    assert torch.allclose(attention_probs(q, k, 0.3)[bi, hi], P, atol=1e-14)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "opt", "phi", "gpt_neox", "granite", "olmo2", "cohere",
                                    "smollm3"])
@pytest.mark.parametrize("mixer", ["discrete_mamba2", "mamba2"])
def test_factored_stage1_equals_replayed_attention(family: str, mixer: str) -> None:
    teacher = random_model(family).eval()
    student = naive_student(teacher, mixer=mixer).eval()
    nodes = replaced_nodes(student)
    ids = torch.randint(3, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    paths = [n.path for n in nodes]
    with record_attention_qk(teacher, paths) as qk:
        fact = run_teacher(teacher, ids, attention_paths=paths)
    with eager_attention(teacher):
        eager = run_teacher(teacher, ids, attention_paths=paths)
        for node in nodes:
            assert qk[node.path].plain, qk[node.path].why
            m = student.get_submodule(node.path)
            u = fact.attention[node.path].hidden_states
            assert torch.allclose(u, eager.attention[node.path].hidden_states, atol=1e-6)
            replayed = node_distance(teacher, student, node, eager.attention[node.path])  # (b, h)
            from verify.stage1_matrix import factored_distance

            factored = factored_distance(m, u, qk[node.path])
            assert rel(factored, replayed) < 1e-5, (node.path, factored, replayed)
            grads = [torch.autograd.grad(d.sum(), m.matrix_parameters(), allow_unused=True) for d in (factored, replayed)]
            for a, b in zip(*grads):
                if a is not None or b is not None:
                    assert rel(a, b) < 1e-4


@pytest.mark.parametrize("L", [9, 24])  # shorter and longer than Gemma2's window of 16
def test_recording_softcapped_attention_equals_eager(L: int) -> None:
    """Gemma2 soft-caps its attention logits (SDPA cannot): the recording pass computes them itself."""
    teacher = random_model("gemma2").eval()
    ids = torch.randint(3, 300, (2, L), generator=torch.Generator().manual_seed(2))
    paths = [f"model.layers.{i}.self_attn" for i in range(4)]
    with record_attention_qk(teacher, paths) as qk:
        recorded = teacher(ids, use_cache=False).logits
    assert not any(q.plain for q in qk.values()) and "softcap" in qk[paths[1]].why
    with eager_attention(teacher):
        eager = teacher(ids, use_cache=False).logits
    assert rel(recorded, eager) < 1e-5


def test_stage1_switches_to_replay_for_a_window_shorter_than_the_sequence() -> None:
    teacher = random_model("gemma3_text").eval()  # sliding window 16 on its sliding layers
    student = naive_student(teacher).eval()
    objective = MatrixOrientation(teacher, student, replaced_nodes(student))
    short = objective.train_step(torch.randint(3, 300, (1, 12)), 1.0)
    assert objective.factored and torch.isfinite(short["loss"])
    long = objective.train_step(torch.randint(3, 300, (1, 24)), 1.0)
    assert not objective.factored and "sliding window of 16 < 24" in objective.replayed_because
    assert torch.isfinite(long["loss"])


@pytest.mark.parametrize("family", ["gpt_neo", "falcon"])
def test_stage1_replays_attention_that_never_calls_the_interface(family: str) -> None:
    """GPT-Neo and Falcon compute their softmax themselves (Falcon, from transformers 5.25, calls the interface
    with a mask of its own): no q/k used, stage 1 replays the eager attention."""
    teacher = random_model(family).eval()
    teacher.config._attn_implementation = "sdpa"  # as loaded from a directory; Falcon cannot switch at run time
    student = naive_student(teacher).eval()
    nodes = replaced_nodes(student)
    objective = MatrixOrientation(teacher, student, nodes)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(5))
    loss = objective.train_step(ids, 1.0)["loss"]
    reasons = ("does not call transformers' AttentionInterface", "an attention mask tensor (padding, or a mask of the "
               "family's own)")
    assert not objective.factored and any(r in objective.replayed_because for r in reasons), objective.replayed_because
    with eager_attention(teacher):  # the same loss, replayed by hand
        recorded = run_teacher(teacher, ids, attention_paths=[n.path for n in nodes])
        by_hand = torch.stack([node_distance(teacher, student, n, recorded.attention[n.path]).mean() for n in nodes])
    assert rel(loss, by_hand.mean()) < 1e-5


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_distill_loss_equals_full_logits(ce_weight: float, temperature: float) -> None:
    g = torch.Generator().manual_seed(2)
    N, d, dt, V = 37, 8, 7, 50
    hs = torch.randn(N, d, generator=g, dtype=F64, requires_grad=True)
    Ws = torch.randn(V, d, generator=g, dtype=F64, requires_grad=True)
    bs = torch.randn(V, generator=g, dtype=F64, requires_grad=True)
    ht, Wt, bt = torch.randn(N, dt, generator=g, dtype=F64), torch.randn(V, dt, generator=g, dtype=F64), torch.randn(V, generator=g, dtype=F64)
    y = torch.randint(0, V, (N,), generator=g)
    y[-3:] = -1
    loss, kl, ce = fused_distill_loss(hs, Ws, bs, ht, Wt, bt, y, temperature=temperature, kl_weight=0.7,
                                      ce_weight=ce_weight, chunk=10)
    got = torch.autograd.grad(loss * 1.7, [hs, Ws, bs])
    s, z = F.linear(hs, Ws, bs), F.linear(ht, Wt, bt)
    lt, ls = F.log_softmax(z / temperature, -1), F.log_softmax(s / temperature, -1)
    kl_ref = (lt.exp() * (lt - ls)).sum(-1).mean()
    ce_ref = F.cross_entropy(s[y >= 0], y[y >= 0])
    ref = 0.7 * temperature**2 * kl_ref + ce_weight * ce_ref
    want = torch.autograd.grad(ref * 1.7, [hs, Ws, bs])
    assert abs(loss.item() - ref.item()) < 1e-12 and abs(kl.item() - kl_ref.item()) < 1e-12
    assert all(rel(a, b) < 1e-12 for a, b in zip(got, want))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_stage3_fused_path_equals_full_logits(family: str) -> None:
    teacher = random_model(family).eval()
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(3))
    losses, grads = {}, {}
    for fused in (True, False):
        student = naive_student(teacher).eval()  # same seed: identical students
        objective = Distillation(teacher, student, replaced_nodes(student), temperature=1.5, ce_weight=0.2)
        assert heads_are_plain([teacher, student], ids)
        objective.fused = fused
        objective.freeze_others()
        metrics = objective.train_step(ids, 1.0)
        losses[fused] = {k: v.item() for k, v in metrics.items()}
        grads[fused] = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert grads[True].keys() == grads[False].keys() and grads[True]
    assert all(rel(grads[True][n], grads[False][n]) < 1e-4 for n in grads[True]), family


def test_softcapped_logits_take_the_full_path() -> None:
    teacher = random_model("gemma3_text").eval()
    teacher.config.final_logit_softcapping = 3.0
    student = naive_student(teacher).eval()
    assert not heads_are_plain([teacher, student], torch.randint(3, 300, (1, 8)))
