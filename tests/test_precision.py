"""Recipe ``precision``: which autocast dtype each value resolves to, and what the student records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery import runtime
from surgery.errors import RecipeError
from surgery.pipeline import apply
from surgery.recipe import Recipe
from surgery.runtime import autocast_dtype, native_bf16

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


@pytest.mark.parametrize(("precision", "device", "expected"), [
    ("auto", CPU, None), ("auto", CUDA, torch.bfloat16), ("fp32", CUDA, None), ("bf16", CPU, torch.bfloat16),
])  # bf16-if-native on CUDA depends on the GPU: test_native_bf16_on_cuda_needs_ampere_or_later
def test_precision_resolves_to_an_autocast_dtype(precision: str, device: torch.device, expected: torch.dtype | None) -> None:
    assert autocast_dtype(precision, device) == expected


@pytest.mark.parametrize("native", [True, False])
def test_bf16_if_native_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    assert autocast_dtype("bf16-if-native", CPU) == (torch.bfloat16 if native else None)


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(False, False, False), (True, False, True),
                                                              (False, True, True), (None, None, False)])
def test_native_bf16_reads_the_cpu_probes(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool | None,
                                          amx: bool | None, expected: bool) -> None:
    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:  # a torch without the probe
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=value: value)
    assert native_bf16(CPU) is expected
    assert not native_bf16(torch.device("mps"))


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_native_bf16_on_cuda_needs_ampere_or_later(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                                   expected: bool) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bf16(CUDA) is expected
    assert autocast_dtype("bf16-if-native", CUDA) == (torch.bfloat16 if expected else None)
    assert autocast_dtype("auto", CUDA) == torch.bfloat16  # `auto` stays bf16 on every GPU, as before


def test_the_student_records_the_precision_it_trained_in(tmp_path: Path) -> None:
    one_step = [f"stages.stage{s}.tokens=256" for s in (1, 2, 3)]
    out = apply(Recipe.load(TINY, [f"output.dir={tmp_path / 'out'}", "device=cpu", "precision=bf16-if-native",
                                   "verify.tokens=128", *one_step]))
    expected = {"device": "cpu", "precision": "bf16-if-native",
                "autocast": "bfloat16" if native_bf16(CPU) else "float32"}
    assert json.loads((out / "report.json").read_text())["compute"] == expected
    assert json.loads((out / "provenance.json").read_text())["compute"] == expected


def test_an_unknown_precision_names_the_choices() -> None:
    with pytest.raises(RecipeError, match=r"precision[\s\S]*bf16-if-native"):
        Recipe.load(TINY, ["precision=bf16-native"])
