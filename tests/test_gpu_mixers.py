"""GPU: the Triton paths (surgery's fused kernels, mamba-ssm) against the float64 reference; cached decode.

Skipped without CUDA (and a backend without its kernels). Run on the GPU machine (mamba-ssm: see
surgery/ops/cuda.py):

    python -m pytest tests/test_gpu_mixers.py -q

Tolerances are norm-relative errors against the plain-torch reference in float64 on the same
(rounded) inputs: float32 < 1e-3, bfloat16 < 2e-2, for the outputs and every input gradient.
Triton compiles float32 dots as TF32 on Ampere/Hopper unless ``TRITON_F32_DEFAULT=ieee``; this
module sets that default (before any kernel compiles) so that the float32 check tests the kernel
mapping at float32 precision. Without it, expect float32 errors of order 1e-3 (TF32).
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from surgery import ops  # noqa: E402
from surgery.cache import enable_recurrent_cache  # noqa: E402
from surgery.mixers import get_mixer  # noqa: E402
from surgery.mixers.testing import naive_student  # noqa: E402
from surgery.random_models import random_model  # noqa: E402

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


# SURGERY_GPU_BACKENDS=fused skips mamba-ssm's kernels (their cold autotuning takes minutes).
BACKENDS = os.environ.get("SURGERY_GPU_BACKENDS", "fused,mamba_ssm").split(",")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, cuda: torch.device) -> str:
    """A fast backend whose kernels import on this CUDA machine (skips otherwise, with the reason)."""
    ok, why = ops._load(request.param)
    if not ok:
        pytest.skip(f"{request.param} kernels unavailable: {why}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return request.param


@pytest.fixture
def kernel(backend: str, cuda: torch.device) -> torch.device:
    return cuda


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(fn, inputs: dict[str, torch.Tensor], dy: torch.Tensor, ds: torch.Tensor):
    """Forward and backward from fresh leaves: (y, final state, {input: grad})."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, s = fn(**leaves)
    torch.autograd.backward([y, s], [dy.to(y.dtype), ds.to(s.dtype)])
    return y.detach(), s.detach(), {k: v.grad for k, v in leaves.items()}


def compare(fn_fast, fn_ref, inputs: dict[str, torch.Tensor], dtype: torch.dtype, y_shape, s_shape, device) -> None:
    g = torch.Generator(device=device).manual_seed(1)
    dy = torch.randn(*y_shape, generator=g, device=device)
    ds = torch.randn(*s_shape, generator=g, device=device)
    y, s, grads = run(fn_fast, inputs, dy, ds)
    inputs64 = {k: v.double() for k, v in inputs.items()}  # the same rounded values, in float64
    y_ref, s_ref, grads_ref = run(fn_ref, inputs64, dy.double(), ds.double())
    errors = {"y": rel(y, y_ref), "final_state": rel(s, s_ref)}
    errors |= {f"d{k}": rel(grads[k], grads_ref[k]) for k in inputs}
    bad = {k: v for k, v in errors.items() if not v < TOL[dtype]}
    assert not bad, f"{dtype}: relative errors above {TOL[dtype]}: {bad} (all: {errors})"


def decay_inputs(dtype: torch.dtype, device: torch.device, b=2, L=300, h=4, p=32, n=16, gB=2, gC=4, pad=0):
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device) * scale

    t = {
        "x": r(b, L, h, p).to(dtype),
        "log_a": (-F.softplus(r(b, L, h) - 1)).to(dtype),
        "B": r(b, L, gB, n, scale=n**-0.5).to(dtype),
        "C": r(b, L, gC, n, scale=n**-0.5).to(dtype),
        "D": r(h),
        "initial_state": r(b, h, p, n),
    }
    if pad:  # left padding as the mixers feed it: zero input, decay 1
        t["x"][:, :pad] = 0
        t["log_a"][:, :pad] = 0
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", [0, 5])
def test_triton_decay_form_matches_reference(kernel: torch.device, backend: str, dtype: torch.dtype, pad: int) -> None:
    t = decay_inputs(dtype, kernel, pad=pad)
    # Padding enters as x = 0 and log_a = 0 (dt = 0), as the mixers feed it. There the kernel's input scale dt is 0,
    # so d(out)/dx is 0 on the kernel path but not in the decay form: mask x like the mixers do (grads then agree).
    keep = torch.ones(1, t["x"].shape[1], 1, 1, device=kernel, dtype=dtype)
    keep[:, :pad] = 0

    def fast(x, log_a, B, C, D, initial_state):
        return ops.ssd(x * keep, log_a, B, C, chunk_size=64, D=D, initial_state=initial_state, backend=backend)

    def ref(x, log_a, B, C, D, initial_state):
        return ops.ssd(x * keep.to(x.dtype), log_a, B, C, chunk_size=64, D=D, initial_state=initial_state, backend="reference")

    compare(fast, ref, t, dtype, t["x"].shape, t["initial_state"].shape, kernel)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [32, 64])
def test_triton_without_decay_matches_reference(kernel: torch.device, backend: str, dtype: torch.dtype, p: int) -> None:
    """``log_a=None`` (no decay: linear attention, the low_rank mixer) on each kernel against the reference.

    mamba-ssm's decay-form mapping divides x by ``-log_a``: zeros there would drop every token's input."""
    t = decay_inputs(dtype, kernel, L=300, p=p)
    t.pop("log_a")

    def fast(x, B, C, D, initial_state):
        return ops.ssd(x, None, B, C, chunk_size=64, D=D, initial_state=initial_state, backend=backend)

    def ref(x, B, C, D, initial_state):
        return ops.ssd(x, None, B, C, chunk_size=64, D=D, initial_state=initial_state, backend="reference")

    compare(fast, ref, t, dtype, t["x"].shape, t["initial_state"].shape, kernel)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dt_form_matches_reference(kernel: torch.device, backend: str, dtype: torch.dtype) -> None:
    t = decay_inputs(dtype, kernel, L=200, gB=2, gC=2)
    g = torch.Generator(device=kernel).manual_seed(2)
    t.pop("log_a")
    t["dt"] = F.softplus(torch.randn(2, 200, 4, generator=g, device=kernel) - 2)
    t["A"] = -torch.rand(4, generator=g, device=kernel) * 4 - 0.5

    def fast(x, dt, A, B, C, D, initial_state):
        return ops.ssd_dt(x, dt, A, B, C, chunk_size=64, D=D, initial_state=initial_state, backend=backend)

    def ref(x, dt, A, B, C, D, initial_state):
        return ops.ssd_dt(x, dt, A, B, C, chunk_size=64, D=D, initial_state=initial_state, backend="reference")

    compare(fast, ref, t, dtype, t["x"].shape, t["initial_state"].shape, kernel)


# Per mixer: 4 heads of 32, a 32-wide state / rank, B shared by 2 groups where the mixer has groups.
# chunk_size 48 is not a power of two (the kernel rounds it up).
MIXER_PARAMS = {
    "discrete_mamba2": {"chunk_size": 48, "n_v_heads": 4, "n_qk_heads": 4, "n_b_heads": 2, "head_dim": 32, "d_state": 32},
    "mamba2": {"chunk_size": 48, "n_heads": 4, "ngroups": 2, "head_dim": 32, "d_state": 32},
    "low_rank": {"chunk_size": 48, "n_heads": 4, "n_b_heads": 2, "head_dim": 32, "rank": 32},  # SSD scan, zero decay
    "semiseparable": {"chunk_size": 16, "n_heads": 4, "n_b_heads": 2, "head_dim": 32, "d_state": 32},  # plain torch on CUDA
    "toeplitz": {"n_heads": 4, "head_dim": 32, "kernel_size": 64},  # plain torch on CUDA
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MIXER_PARAMS))
def test_mixer_triton_matches_reference(kernel: torch.device, backend: str, dtype: torch.dtype, name: str) -> None:
    mixer_matches_reference(kernel, backend, dtype, name, MIXER_PARAMS[name])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_low_rank_at_student_head_dims(kernel: torch.device, backend: str, dtype: torch.dtype, head_dim: int) -> None:
    """The SmolLM2 student's head dim 64 (and 128, mamba-ssm only): a normalised low_rank once scanned 65
    columns, which the fused kernel refuses, and mamba-ssm's decay mapping dropped every zero-decay input."""
    if backend == "fused" and head_dim > ops.FUSED_MAX_DIM:
        pytest.skip("above the fused kernels' head dim; auto takes mamba-ssm")
    params = {"chunk_size": 64, "n_heads": 2, "n_b_heads": 1, "head_dim": head_dim, "rank": 32}
    mixer_matches_reference(kernel, backend, dtype, "low_rank", params)


def mixer_matches_reference(kernel: torch.device, backend: str, dtype: torch.dtype, name: str, params: dict) -> None:
    """The mixer's output and every gradient on ``backend`` against the plain-torch path, same dtype."""
    cls = get_mixer(name)
    torch.manual_seed(0)
    mixer = cls(128, params, layer_idx=0)
    mixer.init_from_attention(None, cls.init_model())
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mixer = mixer.to(kernel, dtype)
    u = torch.randn(2, 150, 128, device=kernel).to(dtype)
    mask = torch.ones(2, 150, dtype=torch.bool, device=kernel)
    mask[0, :7] = False
    dout = torch.randn(2, 150, 128, device=kernel).to(dtype)
    results = {}
    for which in (backend, "reference"):
        mixer.zero_grad()
        leaf = u.clone().requires_grad_()
        with ops.use_backend(which):
            out = mixer.mix(leaf, mask)
        out.backward(dout)
        results[which] = {"out": out.detach(), "du": leaf.grad} | {n: p.grad.clone() for n, p in mixer.named_parameters()}
    errors = {k: rel(results[backend][k], results["reference"][k]) for k in results[backend]}
    bad = {k: v for k, v in errors.items() if not v < TOL[dtype]}
    assert not bad, f"{name} {dtype}: {bad}"


@pytest.mark.parametrize("name", list(MIXER_PARAMS))
def test_cached_decode_on_cuda(kernel: torch.device, backend: str, name: str) -> None:
    with ops.use_backend(backend):
        cached_decode_matches_recomputation(kernel, name)


def cached_decode_matches_recomputation(kernel: torch.device, name: str) -> None:
    for layers in (None, [0, 2]):  # fully converted, then hybrid
        params = {} if name == "toeplitz" else {"chunk_size": 16}  # Toeplitz has no chunks
        model = naive_student(random_model("llama"), mixer=name, layers=layers, params=params).to(kernel)
        enable_recurrent_cache(model)
        ids = torch.randint(3, 300, (2, 37), device=kernel)
        out = model.generate(
            ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
        )
        full = model(out.sequences, use_cache=False).logits
        assert (torch.stack(out.logits, 1) - full[:, 36:-1]).abs().max() < 1e-4
    bf16 = naive_student(random_model("llama"), mixer=name).to(kernel, torch.bfloat16)
    enable_recurrent_cache(bf16)
    out = bf16.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    full = bf16(out.sequences, use_cache=False).logits.float()
    got = torch.stack(out.logits, 1).float()
    assert rel(got, full[:, 36:-1]) < 5e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("L", "h", "p", "n", "gB", "gC"), [(300, 4, 32, 16, 2, 4), (1000, 9, 64, 64, 3, 9), (129, 2, 128, 128, 1, 2)])
def test_packed_documents_and_student_shapes(kernel: torch.device, backend: str, dtype: torch.dtype,
                                              L: int, h: int, p: int, n: int, gB: int, gC: int) -> None:
    if backend == "fused" and max(p, n) > ops.FUSED_MAX_DIM:
        with pytest.raises(RuntimeError, match="above the fused kernels"):
            ops.ssd(*(torch.zeros(1, 8, h, p, device=kernel), torch.zeros(1, 8, h, device=kernel),
                      torch.zeros(1, 8, gB, n, device=kernel), torch.zeros(1, 8, gC, n, device=kernel)),
                    chunk_size=64, backend="fused")
        return  # auto routes these shapes to mamba-ssm or the reference (test_ops_ssd.py checks the routing)
    t = decay_inputs(dtype, kernel, L=L, h=h, p=p, n=n, gB=gB, gC=gC)
    seq = torch.zeros(2, L, dtype=torch.long, device=kernel)
    seq[:, L // 3 :] = 1
    seq[1, L // 2 :] = 2  # the second row has three documents, the first two
    seq[:, L - 5 :] += 1  # a short document at the end, straddling no chunk boundary

    def fast(x, log_a, B, C, D, initial_state):
        return ops.ssd(x, log_a, B, C, chunk_size=128, D=D, initial_state=initial_state, seq_idx=seq, backend=backend)

    def ref(x, log_a, B, C, D, initial_state):
        return ops.ssd(x, log_a, B, C, chunk_size=64, D=D, initial_state=initial_state, seq_idx=seq, backend="reference")

    compare(fast, ref, t, dtype, t["x"].shape, t["initial_state"].shape, kernel)


def test_fused_batch_beyond_the_launch_grid_runs_in_slices(cuda: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch x heads above CUDA's grid limit (batch 8192, 9 heads failed with "invalid argument"): slices, same result."""
    ok, why = ops._load("fused")
    if not ok:
        pytest.skip(f"fused kernels unavailable: {why}")
    from surgery.ops import launch_limits

    monkeypatch.setattr(launch_limits, "GRID_Y_MAX", 2 * 4)  # two rows of 4 heads per launch: slices 2, 2, 1
    t = decay_inputs(torch.float32, cuda, b=5, L=130)
    seq = torch.zeros(5, 130, dtype=torch.long, device=cuda)
    seq[:, 70:] = 1

    def fast(x, log_a, B, C, D, initial_state):
        return ops.ssd(x, log_a, B, C, chunk_size=64, D=D, initial_state=initial_state, seq_idx=seq, backend="fused")

    def ref(x, log_a, B, C, D, initial_state):
        return ops.ssd(x, log_a, B, C, chunk_size=64, D=D, initial_state=initial_state, seq_idx=seq, backend="reference")

    compare(fast, ref, t, torch.float32, t["x"].shape, t["initial_state"].shape, cuda)


def test_fallback_warns_once_and_uses_reference(cuda: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_load", lambda backend: (False, "ImportError: pretend"))
    monkeypatch.setattr(ops, "_WARNED", False)
    t = decay_inputs(torch.float32, cuda, L=40)
    with pytest.warns(RuntimeWarning, match="pretend"):
        y, _ = ops.ssd(t["x"], t["log_a"], t["B"], t["C"], chunk_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.ssd(t["x"], t["log_a"], t["B"], t["C"], chunk_size=16)  # no second warning
    y_ref, _ = ops.ssd(t["x"], t["log_a"], t["B"], t["C"], chunk_size=16, backend="reference")
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 1024, 576, 4), (2, 301, 768, 4), (3, 50, 40, 3)])
def test_fused_causal_conv_matches_reference(cuda: torch.device, dtype: torch.dtype, shape: tuple) -> None:
    """The fused depthwise causal conv (output, dx, dweight, dbias) against F.conv1d in float64."""
    ok, why = ops._load("fused")
    if not ok:
        pytest.skip(f"fused kernels unavailable: {why}")
    from surgery.ops.conv_fused import causal_conv1d_fused

    b, L, ch, K = shape
    g = torch.Generator(device=cuda).manual_seed(L)
    x = torch.randn(b, L, ch, generator=g, device=cuda).to(dtype)
    w = torch.randn(ch, K, generator=g, device=cuda)  # parameters stay float32, as under autocast
    bias = torch.randn(ch, generator=g, device=cuda)
    dy = torch.randn(b, L, ch, generator=g, device=cuda)

    def run(fn, inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        y.backward(dy.to(y.dtype))
        return [y.detach(), *(t.grad for t in leaves)]

    def reference(x_, w_, b_):
        return F.conv1d(F.pad(x_.transpose(1, 2), (K - 1, 0)), w_[:, None], b_, groups=ch).transpose(1, 2)

    fast = run(causal_conv1d_fused, [x, w, bias])
    ref = run(reference, [x.double(), w.double(), bias.double()])
    errors = {name: rel(a, r) for name, a, r in zip(("y", "dx", "dw", "dbias"), fast, ref)}
    assert fast[0].dtype == dtype and fast[1].dtype == dtype and fast[2].dtype == torch.float32
    bad = {k: v for k, v in errors.items() if not v < TOL[dtype]}
    assert not bad, f"{dtype}: relative errors above {TOL[dtype]}: {bad} (all: {errors})"


def test_mixer_conv_dispatches_to_the_fused_kernel_on_cuda(cuda: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixer's conv on CUDA runs the fused kernel (window included) and equals the F.conv1d path."""
    from surgery.mixers._common import causal_conv, make_conv
    from surgery.ops import conv_fused

    monkeypatch.setenv("SURGERY_NEW_GPU_KERNELS", "1")  # opt-in until this test has passed on a GPU
    calls = []
    kernel = conv_fused.causal_conv1d_fused
    monkeypatch.setattr(conv_fused, "causal_conv1d_fused", lambda *a: calls.append(1) or kernel(*a))

    conv = make_conv(96, 4, True).to(cuda)
    x = torch.randn(2, 70, 96, device=cuda)
    y_fast, win_fast = causal_conv(x, conv, None)
    with ops.use_backend("reference"):
        y_ref, win_ref = causal_conv(x, conv, None)
    assert calls == [1], "the fused conv was not called on CUDA"
    assert rel(y_fast, y_ref) < 1e-3 and torch.equal(win_fast, win_ref)
    short = x[:, :2]  # shorter than the window: zero-padded on the left, like the reference
    with ops.use_backend("reference"):
        ref_short = causal_conv(short, conv, None)[1]
    assert torch.equal(causal_conv(short, conv, None)[1], ref_short)
