"""Weight transfer Q->C, K->B, V->x, O->out for every registered mixer on every family.

Parametrised over ``surgery.mixers.MIXERS``, so the real mixers are covered as
soon as they are registered. A mixer is asked for a full transfer through
``FULL_TRANSFER_INIT`` (a class attribute, if it has one) or by switching on
every ``init`` option named like a transfer (``q_to_C``, ``transfer``, ...;
:func:`rewrites.rules.transfer_fields`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from pydantic import ValidationError

import placeholder_mixer
from rewrites.adapters import get_adapter
from rewrites.rules import transfer_fields, transfer_requested
from surgery.mixers import MIXERS, Mixer
from surgery.random_models import FAMILIES, random_model
from surgery.rewriter import rewrite



@pytest.fixture(autouse=True)
def _placeholder() -> Iterator[None]:
    """The test mixer is registered for each test only (other modules parametrise over MIXERS)."""
    with placeholder_mixer.registered():
        yield

SOURCE_OF = {"C": "q", "B": "k", "x": "v", "out": "o"}


def full_transfer_init(cls: type[Mixer]) -> dict[str, Any] | None:
    """An ``init`` dict asking ``cls`` to copy every teacher projection it can, or None."""
    preset = getattr(cls, "FULL_TRANSFER_INIT", None)
    if preset is not None:
        return dict(preset)
    candidates: list[Any] = [True, ["q", "k", "v", "o"], "qkvo", "all", {"C": "q", "B": "k", "x": "v", "out": "o"}]
    init: dict[str, Any] = {}
    for name in transfer_fields(cls.init_model):
        for value in candidates:
            try:
                cls.init_model.model_validate({**init, name: value})
            except ValidationError:
                continue
            init[name] = value
            break
    if not init or not transfer_requested(cls, cls.init_model.model_validate(init)):
        return None
    return init


def _expected_head(h: int, heads_view: int, heads_teacher: int) -> int:
    """Teacher head feeding mixer head ``h`` (GQA: each key/value head repeated per group)."""
    return h * heads_teacher // heads_view


@pytest.mark.parametrize("mixer", sorted(set(MIXERS) | {placeholder_mixer.NAME}))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transfer_slices_equal_teacher_heads(mixer: str, family: str) -> None:
    cls = MIXERS[mixer]
    init = full_transfer_init(cls)
    if init is None:
        pytest.skip(f"{mixer} has no init option requesting a weight transfer")
    teacher = random_model(family)
    student, plan = rewrite(teacher, [{"layers": [0, 2], "mixer": mixer, "init": init}])
    views = {v.path: v for v in get_adapter(teacher).attention_views()}
    assert [e.layer for e in plan.replaced] == [0, 2]
    for entry in plan.replaced:
        assert entry.transfer, f"{mixer} transferred nothing with init {init}"
        w = views[entry.path].weights()
        mix_views = student.get_submodule(entry.path).weight_views()
        sources = " ".join(entry.transfer.values())
        checked = 0
        for key, src in SOURCE_OF.items():
            teacher_name = views[entry.path].sources()[src]  # e.g. '...c_attn.weight[:, 64:128].T'
            if key not in mix_views or teacher_name not in sources:
                continue
            t, m = getattr(w, src), mix_views[key]
            if key == "out":  # (d, heads, p)
                p = min(t.shape[2], m.shape[2])
                for h in range(m.shape[1]):
                    assert torch.equal(m[:, h, :p], t[:, _expected_head(h, m.shape[1], t.shape[1]), :p]), (key, h)
            else:  # (heads, dim, d)
                n = min(t.shape[1], m.shape[1])
                for h in range(m.shape[0]):
                    assert torch.equal(m[h, :n], t[_expected_head(h, m.shape[0], t.shape[0]), :n]), (key, h)
            checked += 1
        assert checked, f"no transferred weight of {mixer} could be checked (record: {entry.transfer})"


def test_gqa_expansion_explicit() -> None:
    """Llama tiny: 4 query heads, 2 KV heads -> B/x heads (0, 1, 2, 3) read KV heads (0, 0, 1, 1)."""
    teacher = random_model("llama")
    student, _ = rewrite(teacher, [{"layers": 0, "mixer": placeholder_mixer.NAME}])
    k = teacher.model.layers[0].self_attn.k_proj.weight.view(2, 16, 64)
    B = student.model.layers[0].self_attn.weight_views()["B"]
    for h, g in enumerate((0, 0, 1, 1)):
        assert torch.equal(B[h], k[g])


def test_no_transfer_requested_passes_no_weights() -> None:
    teacher = random_model("llama")
    student, plan = rewrite(teacher, [{"layers": 0, "mixer": placeholder_mixer.NAME, "init": {"transfer": []}}])
    assert plan.replaced[0].transfer == {}
    q = teacher.model.layers[0].self_attn.q_proj.weight.view(4, 16, 64)
    assert not torch.equal(student.model.layers[0].self_attn.weight_views()["C"], q)
