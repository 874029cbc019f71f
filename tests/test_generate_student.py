"""Generation with loaded students: recurrent cache by default, cached == recomputed, constant state; the CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import surgery
from surgery.cache import SSMCacheLayer, SurgeryCache
from surgery.errors import SurgeryError
from surgery.generate import generate_text, generate_texts
from surgery.hf_conventions import output_cache
from surgery.options import GenerateOptions
from surgery.rewriter import rewrite
from surgery.student import load, load_tokenizer, save
from surgery.teacher import load_teacher

pytestmark = pytest.mark.hf_contract  # also run on the oldest supported and the newest transformers (.ci/run)

ROOT = Path(__file__).resolve().parents[1]
CPU = {"device": "cpu"}


def make_dir(path: Path, family: str = "llama", rules: list | None = None) -> Path:
    teacher = load_teacher(f"random:{family}")
    rules = rules if rules is not None else [{"mixer": "discrete_mamba2", "params": {"d_state": 16, "chunk_size": 4}}]
    student, plan = rewrite(teacher.model, rules)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial gate, conv and decay
        for name, p in student.named_parameters():
            if any(k in name for k in ("z_proj", "conv_", "z_bias", "A_log_proj", "dt_proj")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return save(student, path, tokenizer=teacher.tokenizer, plan=plan, teacher=teacher)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dir(tmp_path_factory.mktemp("gen") / "llama")


def prompt(b: int = 2, L: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 260, (b, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("family", "rules"),
    [("llama", None), ("gpt2", None), ("phi", [{"mixer": "mamba2", "layers": [0, 2], "params": {"d_state": 8}}])],
)
def test_cached_generation_equals_recomputation(tmp_path: Path, family: str, rules: list | None) -> None:
    model = load(make_dir(tmp_path / "s", family, rules))
    ids = prompt()
    out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    assert isinstance(output_cache(out), SurgeryCache)  # the default, nothing passed
    full = model(out.sequences, use_cache=False).logits  # (b, L + 6, V), no cache at all
    step = torch.stack(out.logits, 1)  # (b, 6, V)
    assert (step - full[:, ids.shape[1] - 1 : -1]).abs().max().item() < 1e-4
    fresh = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=False)
    assert torch.equal(fresh, out.sequences)


def _state_bytes(cache: SurgeryCache) -> tuple[int, list[tuple[int, ...]]]:
    shapes = []
    for layer in cache.layers:
        assert isinstance(layer, SSMCacheLayer)
        shapes += [tuple(layer.ssm_state.shape), tuple(layer.conv_state.shape)]
    return sum(torch.Size(s).numel() for s in shapes), shapes


def test_state_does_not_grow_with_generated_length(student_dir: Path) -> None:
    model = load(student_dir)
    ids = prompt(b=1)
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, "return_dict_in_generate": True}
    n = 8
    short = model.generate(ids, max_new_tokens=n, **kw)
    long = model.generate(ids, max_new_tokens=2 * n, **kw)
    assert long.sequences.shape[1] - short.sequences.shape[1] == n
    size_n, shapes_n = _state_bytes(output_cache(short))
    size_2n, shapes_2n = _state_bytes(output_cache(long))
    assert shapes_n == shapes_2n and size_n == size_2n  # constant per sequence
    assert output_cache(long).get_seq_length() == output_cache(short).get_seq_length() + n
    # the teacher's KV cache, measured the same way, does grow
    teacher = load_teacher("random:llama").model
    kv = [output_cache(teacher.generate(ids, max_new_tokens=m, **kw)) for m in (n, 2 * n)]
    assert kv[1].layers[0].keys.shape[-2] == kv[0].layers[0].keys.shape[-2] + n


def test_generate_text_streams_and_returns(student_dir: Path) -> None:
    buf = io.StringIO()
    text = generate_text(str(student_dir), "def f(x):", GenerateOptions(max_new_tokens=12, **CPU), stream=buf)
    assert buf.getvalue() == "def f(x):" + text + "\n"
    assert text  # some bytes came out (the random model needs not stop at EOS in 12 tokens)
    again = generate_text(str(student_dir), "def f(x):", GenerateOptions(max_new_tokens=12, **CPU), stream=None)
    assert again == text  # greedy is deterministic
    tok = load_tokenizer(student_dir)
    model = load(student_dir)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert text == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)



def test_batched_prompts_equal_one_at_a_time(student_dir: Path) -> None:
    """Several prompts of different lengths in one left-padded batch give each prompt's own greedy text."""
    prompts = ["def f(x):", "Once upon a time there", "z"]
    opts = GenerateOptions(max_new_tokens=10, **CPU)
    buf = io.StringIO()
    texts = generate_texts(str(student_dir), prompts, opts, stream=buf)
    assert texts == [generate_text(str(student_dir), p, opts, stream=None) for p in prompts]
    assert buf.getvalue() == "".join(f"--- {i}/3 ---\n{p}{t}\n" for i, (p, t) in enumerate(zip(prompts, texts), 1))


def test_batched_prompts_with_cuda_graph_need_cuda(student_dir: Path) -> None:
    with pytest.raises(SurgeryError, match="needs a CUDA device"):
        generate_texts(str(student_dir), ["a", "b"], GenerateOptions(cuda_graph=True, **CPU), stream=None)

def test_generate_text_sampling_is_seeded(student_dir: Path) -> None:
    opts = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, **CPU)
    a = generate_text(str(student_dir), "x", GenerateOptions(seed=1, **opts), stream=None)
    b = generate_text(str(student_dir), "x", GenerateOptions(seed=1, **opts), stream=None)
    assert a == b


def test_generate_text_with_teacher_reference() -> None:
    text = generate_text("random:gpt2", "hello", GenerateOptions(max_new_tokens=5, **CPU), stream=None)
    assert isinstance(text, str)


def test_cli_generate_subprocess(student_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "surgery", "generate", str(student_dir), "Once upon", "--max-new-tokens", "8",
         "--device", "cpu"], capture_output=True, check=False, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon") and len(proc.stdout) > len("Once upon\n")
    assert "Traceback" not in proc.stderr
    two = subprocess.run(
        [sys.executable, "-m", "surgery", "generate", str(student_dir), "Once upon", "def g", "--max-new-tokens", "8",
         "--device", "cpu"], capture_output=True, check=False, text=True, env=env, cwd=ROOT, timeout=120)
    assert two.returncode == 0, two.stderr
    assert two.stdout.startswith("--- 1/2 ---\n" + proc.stdout)  # batched row 1 == the single run
    assert "\n--- 2/2 ---\ndef g" in two.stdout


@pytest.mark.slow
def test_embedded_teacher_student_generates(tmp_path: Path) -> None:
    """SmolLM2-135M with the attention of layers 0-14 replaced: save, load in a fresh process, generate."""
    start = time.perf_counter()
    teacher = load_teacher("builtin:smollm2-135m")
    student, plan = rewrite(teacher.model, [{"mixer": "discrete_mamba2", "layers": "0:15",
                                             "init": {"q_to_C": True, "k_to_B": True, "v_to_x": True, "o_to_out": True}}])
    d = surgery.save(student, tmp_path / "smol", tokenizer=teacher.tokenizer, plan=plan, teacher=teacher)
    model = surgery.load(d)
    ids = teacher.tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert isinstance(output_cache(out), SurgeryCache)
    full = model(out.sequences, use_cache=False).logits
    assert (torch.stack(out.logits, 1) - full[:, ids.shape[1] - 1 : -1]).abs().max().item() < 1e-3
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "surgery", "generate", str(d), "def fibonacci(n):",
                           "--max-new-tokens", "16", "--device", "cpu"], capture_output=True, check=False, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def fibonacci(n):") and len(proc.stdout.strip()) > len("def fibonacci(n):")
    card = (d / "README.md").read_text()
    assert "license: apache-2.0" in card and "15 of 30 attention nodes replaced" in card
    print(f"slow student round trip: {time.perf_counter() - start:.1f} s")


def test_no_cuda_graph_never_consults_the_graph_path(student_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--no-cuda-graph`` goes straight to ``generate``: the graph path is not even asked whether it applies."""
    import surgery.generate as gen

    default = generate_text(str(student_dir), "def f(x):", GenerateOptions(max_new_tokens=8, **CPU), stream=None)

    def refuse(*args: object) -> None:
        raise AssertionError("graph_decode_reason consulted despite --no-cuda-graph")

    monkeypatch.setattr(gen, "graph_decode_reason", refuse)
    opts = GenerateOptions(max_new_tokens=8, no_cuda_graph=True, **CPU)
    assert generate_text(str(student_dir), "def f(x):", opts, stream=None) == default


def test_cuda_graph_and_no_cuda_graph_together_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="--cuda-graph and --no-cuda-graph contradict"):
        GenerateOptions(cuda_graph=True, no_cuda_graph=True)
    done = subprocess.run([sys.executable, "-m", "surgery", "generate", "random:llama", "x", "--cuda-graph",
                           "--no-cuda-graph"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "contradict each other" in done.stderr, done.stderr


def test_compile_is_refused_without_the_graph_and_maps_to_the_decoder_setting() -> None:
    with pytest.raises(ValueError, match="--compile tuned compiles the captured decode step"):
        GenerateOptions(compile="tuned", no_cuda_graph=True)
    with pytest.raises(ValueError, match="compile"):
        GenerateOptions(compile="fast")
    assert [GenerateOptions(compile=c).step_compile for c in ("off", "on", "tuned")] == [False, True, "tuned"]
    done = subprocess.run([sys.executable, "-m", "surgery", "generate", "random:llama", "x", "--compile", "on",
                           "--no-cuda-graph"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "turns off" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "surgery", "generate", "random:llama", "x", "--compile", "tuned",
                           "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "--compile tuned needs a CUDA device" in done.stderr, done.stderr
