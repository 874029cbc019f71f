"""The plain-torch SSD kernels: chunked == naive recurrence == materialised matrix == decode steps."""

from __future__ import annotations

import pytest
import torch

from surgery import ops
from surgery.ops import ssd_chunked, ssd_matrix, ssd_naive, ssd_step

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(b=2, L=11, h=4, p=3, n=5, gB=2, gC=4, dtype=F64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(b, L, h, p, generator=g, dtype=dtype),
        "log_a": -torch.rand(b, L, h, generator=g, dtype=dtype) * 1.5,
        "B": torch.randn(b, L, gB, n, generator=g, dtype=dtype),
        "C": torch.randn(b, L, gC, n, generator=g, dtype=dtype),
        "D": torch.randn(h, generator=g, dtype=dtype),
        "initial_state": torch.randn(b, h, p, n, generator=g, dtype=dtype),
    }
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 64])
def test_chunked_equals_naive_any_chunk_size(chunk_size: int) -> None:
    t = inputs(seed=chunk_size)
    y_ref, s_ref = ssd_naive(**t)
    y, s = ssd_chunked(t["x"], t["log_a"], t["B"], t["C"], chunk_size, D=t["D"], initial_state=t["initial_state"])
    assert rel(y, y_ref) < 1e-10 and rel(s, s_ref) < 1e-10


def test_matrix_equals_recurrence() -> None:
    t = inputs(L=9, seed=1)
    y_ref, _ = ssd_naive(t["x"], t["log_a"], t["B"], t["C"], D=t["D"])
    M = ssd_matrix(t["log_a"], t["B"], t["C"], D=t["D"])  # (b, h, L, L)
    assert M.shape == (2, 4, 9, 9)
    assert torch.all(M.triu(1) == 0)
    assert rel(torch.einsum("bhls,bshp->blhp", M, t["x"]), y_ref) < 1e-10


def test_matrix_entries_match_formula() -> None:
    t = inputs(b=1, L=5, h=2, gB=1, gC=2, seed=2)
    M = ssd_matrix(t["log_a"], t["B"], t["C"])
    la, B, C = t["log_a"][0], t["B"][0], t["C"][0]
    h, l, s = 1, 4, 1
    want = (C[l, h] @ B[s, 0]) * torch.exp(la[s + 1 : l + 1, h].sum())
    assert abs(M[0, h, l, s].item() - want.item()) < 1e-12


def test_steps_equal_full_forward_and_state_continues() -> None:
    t = inputs(L=10, seed=3)
    y_full, s_full = ssd_chunked(t["x"], t["log_a"], t["B"], t["C"], 4, D=t["D"])
    # first 6 tokens chunked, then 4 decoding steps from the state
    y_a, state = ssd_chunked(t["x"][:, :6], t["log_a"][:, :6], t["B"][:, :6], t["C"][:, :6], 4, D=t["D"])
    ys = [y_a]
    for i in range(6, 10):
        y_t, state = ssd_step(t["x"][:, i], t["log_a"][:, i], t["B"][:, i], t["C"][:, i], D=t["D"], state=state)
        ys.append(y_t[:, None])
    assert rel(torch.cat(ys, 1), y_full) < 1e-10 and rel(state, s_full) < 1e-10


def test_split_sequence_with_initial_state() -> None:
    t = inputs(L=12, seed=4)
    y_full, s_full = ssd_chunked(t["x"], t["log_a"], t["B"], t["C"], 5)
    y1, s1 = ssd_chunked(t["x"][:, :7], t["log_a"][:, :7], t["B"][:, :7], t["C"][:, :7], 5)
    y2, s2 = ssd_chunked(t["x"][:, 7:], t["log_a"][:, 7:], t["B"][:, 7:], t["C"][:, 7:], 5, initial_state=s1)
    assert rel(torch.cat([y1, y2], 1), y_full) < 1e-10 and rel(s2, s_full) < 1e-10


def test_gradcheck_chunked() -> None:
    t = inputs(b=1, L=5, h=2, p=2, n=3, gB=1, gC=2, seed=5, requires_grad=True)

    def f(x, log_a, B, C, D, s0):
        y, s = ssd_chunked(x, log_a, B, C, 2, D=D, initial_state=s0)
        return y, s

    assert torch.autograd.gradcheck(f, tuple(t.values()), eps=1e-6, atol=1e-7, fast_mode=True)


def test_gradcheck_matrix() -> None:
    t = inputs(b=1, L=4, h=2, p=2, n=3, gB=2, gC=1, seed=6, requires_grad=True)
    f = lambda a, B, C, D: ssd_matrix(a, B, C, D=D)  # noqa: E731
    assert torch.autograd.gradcheck(f, (t["log_a"], t["B"], t["C"], t["D"]), fast_mode=True)


def test_dt_form_matches_decay_form() -> None:
    t = inputs(seed=7)
    g = torch.Generator().manual_seed(8)
    dt = torch.nn.functional.softplus(torch.randn(2, 11, 4, generator=g, dtype=F64))
    A = -torch.rand(4, generator=g, dtype=F64) * 2
    y, s = ops.ssd_dt(t["x"], dt, A, t["B"], t["C"], chunk_size=4, D=t["D"], initial_state=t["initial_state"])
    y_ref, s_ref = ssd_naive(t["x"] * dt[..., None], dt * A, t["B"], t["C"], initial_state=t["initial_state"])
    y_ref = y_ref + t["x"] * t["D"][:, None]
    assert rel(y, y_ref) < 1e-10 and rel(s, s_ref) < 1e-10
    M = ssd_matrix(dt * A, t["B"], t["C"], D=t["D"], input_scale=dt)
    y0, _ = ops.ssd_dt(t["x"], dt, A, t["B"], t["C"], chunk_size=4, D=t["D"])
    assert rel(torch.einsum("bhls,bshp->blhp", M, t["x"]), y0) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(dtype: torch.dtype) -> None:
    t = inputs(L=40, seed=9)
    y64, _ = ssd_chunked(t["x"], t["log_a"], t["B"], t["C"], 16, D=t["D"])
    low = {k: v.to(dtype) for k, v in t.items()}
    y, s = ssd_chunked(low["x"], low["log_a"], low["B"], low["C"], 16, D=low["D"])
    assert y.dtype == dtype and s.dtype == torch.float32
    assert rel(y, y64) < (1e-5 if dtype == torch.float32 else 3e-2)


def test_entry_point_cpu_uses_reference_and_checks_backend() -> None:
    t = inputs(seed=10)
    y, _ = ops.ssd(t["x"], t["log_a"], t["B"], t["C"], chunk_size=4, D=t["D"])
    y_ref, _ = ssd_naive(t["x"], t["log_a"], t["B"], t["C"], D=t["D"])
    assert rel(y, y_ref) < 1e-10
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.ssd(t["x"], t["log_a"], t["B"], t["C"], chunk_size=4, backend="fused")
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.ssd(t["x"], t["log_a"], t["B"], t["C"], chunk_size=4, backend="mamba_ssm")
    with pytest.raises(ValueError, match="backend"):
        ops.ssd(t["x"], t["log_a"], t["B"], t["C"], chunk_size=4, backend="fast")  # type: ignore[arg-type]
    assert not ops.kernel_available("cpu") and not ops.kernel_available("cpu", "mamba_ssm")


def test_shape_errors_are_clear() -> None:
    t = inputs()
    with pytest.raises(ValueError, match="log_a"):
        ssd_chunked(t["x"], t["log_a"][:, :-1], t["B"], t["C"], 4)
    with pytest.raises(ValueError, match="B has shape"):
        ssd_chunked(t["x"], t["log_a"], t["B"][..., :1, :].expand(2, 11, 3, 5), t["C"], 4)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(t["x"], t["log_a"], t["B"], t["C"], 0)


def test_segsum() -> None:
    a = torch.randn(6, dtype=F64)
    S = ops.segsum(a)
    for i in range(6):
        for j in range(6):
            want = a[j + 1 : i + 1].sum().item() if i >= j else float("-inf")
            assert S[i, j].item() == pytest.approx(want, abs=1e-12)


def documents(b: int = 2, L: int = 23) -> torch.Tensor:
    """Packed-document ids (b, L): resets at different places per row, one mid-sequence, one near the end."""
    seq = torch.zeros(b, L, dtype=torch.long)
    seq[:, 7:] = 1
    seq[:, L - 3 :] = 2
    seq[1, 2:] += 1
    return seq


def per_document(t: dict[str, torch.Tensor], seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth for packed sequences: every document run on its own (the initial state for the first)."""
    ys, finals = [], []
    for r in range(seq.shape[0]):
        state = t["initial_state"][r : r + 1]
        pieces = []
        for d in seq[r].unique():
            at = (seq[r] == d).nonzero().flatten()
            sl = slice(at[0].item(), at[-1].item() + 1)
            y, final = ssd_naive(t["x"][r : r + 1, sl], t["log_a"][r : r + 1, sl], t["B"][r : r + 1, sl],
                                 t["C"][r : r + 1, sl], D=t["D"], initial_state=state)
            pieces.append(y)
            state = None
        ys.append(torch.cat(pieces, 1))
        finals.append(final)
    return torch.cat(ys), torch.cat(finals)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
def test_packed_documents_never_share_state(chunk_size: int) -> None:
    t = inputs(L=23, seed=20 + chunk_size)
    seq = documents()
    y_doc, s_doc = per_document(t, seq)
    y_naive, s_naive = ssd_naive(**t, seq_idx=seq)
    y, s = ssd_chunked(t["x"], t["log_a"], t["B"], t["C"], chunk_size, D=t["D"], initial_state=t["initial_state"],
                       seq_idx=seq)
    assert rel(y_naive, y_doc) < 1e-12 and rel(s_naive, s_doc) < 1e-12
    assert rel(y, y_doc) < 1e-10 and rel(s, s_doc) < 1e-10
    # a single document is the unpacked computation
    y1, s1 = ssd_chunked(t["x"], t["log_a"], t["B"], t["C"], chunk_size, D=t["D"], initial_state=t["initial_state"],
                         seq_idx=torch.zeros_like(seq))
    y0, s0 = ssd_naive(**t)
    assert rel(y1, y0) < 1e-10 and rel(s1, s0) < 1e-10


def test_packed_documents_gradcheck() -> None:
    t = inputs(b=2, L=9, h=2, p=2, n=3, gB=1, gC=2, seed=30, requires_grad=True)
    seq = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1]])

    def f(x, log_a, B, C, D, initial_state):
        return ssd_chunked(x, log_a, B, C, 4, D=D, initial_state=initial_state, seq_idx=seq)

    assert torch.autograd.gradcheck(f, tuple(t.values()))


def test_auto_routes_shapes_above_the_fused_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_load", lambda backend: (True, None))  # pretend both kernels import
    x = torch.zeros(1, 4, 2, 8)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert ops._fast_backend(x, "auto", "ssd", (64, 64)) == "fused"
    assert ops._fast_backend(x, "auto", "ssd", (128, 64)) == "mamba_ssm"
    with pytest.raises(RuntimeError, match="above the fused kernels' 64"):
        ops._fast_backend(x, "fused", "ssd", (64, 128))


def test_no_decay_is_a_unit_transition() -> None:
    """``log_a=None``: ``H_t = H_{t-1} + x_t B_t^T`` (linear attention), the same as zero log-decay on the reference."""
    t = inputs(seed=7)
    t.pop("log_a")
    y, s = ops.ssd(t["x"], None, t["B"], t["C"], chunk_size=4, D=t["D"], initial_state=t["initial_state"])
    y_ref, s_ref = ssd_naive(t["x"], torch.zeros(t["x"].shape[:3], dtype=F64), t["B"], t["C"], D=t["D"],
                             initial_state=t["initial_state"])
    assert rel(y, y_ref) < 1e-10 and rel(s, s_ref) < 1e-10


def test_new_gpu_kernels_are_opt_in_and_never_on_cpu(monkeypatch) -> None:
    """The fused conv stays off unless SURGERY_NEW_GPU_KERNELS=1, and CPU tensors never take it."""
    from surgery import ops

    x = torch.randn(1, 4, 3)
    monkeypatch.delenv("SURGERY_NEW_GPU_KERNELS", raising=False)
    assert not ops.new_gpu_kernels() and not ops.conv_kernel_applies(x)
    monkeypatch.setenv("SURGERY_NEW_GPU_KERNELS", "1")
    assert ops.new_gpu_kernels() and not ops.conv_kernel_applies(x)  # CPU: the F.conv1d path, no triton import
