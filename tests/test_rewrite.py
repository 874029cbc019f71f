"""rewrite / plan / splice on every family: identity, hybrids, ownership, meta plans, splice check."""

from __future__ import annotations

from collections.abc import Iterator

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import placeholder_mixer
import surgery
from surgery.graph import check_splice, trace_model
from surgery.mixers import Mixer
from surgery.random_models import FAMILIES, random_model
from surgery.rewriter import Plan, plan, rewrite, splice

pytestmark = pytest.mark.hf_contract  # also run on the oldest supported and the newest transformers (.ci/run)



@pytest.fixture(autouse=True)
def _placeholder() -> Iterator[None]:
    """The test mixer is registered for each test only (other modules parametrise over MIXERS)."""
    with placeholder_mixer.registered():
        yield

MIX = placeholder_mixer.NAME
HYBRID = [{"layers": "::4", "mixer": "keep"}, {"mixer": MIX}]


def _eight(family: str) -> torch.nn.Module:
    eight = {"gpt2": {"n_layer": 8}, "gptj": {"n_layer": 8}, "codegen": {"n_layer": 8}, "gpt_bigcode": {"n_layer": 8},
             "gpt_neo": {"num_layers": 8, "attention_types": [[["global", "local"], 4]]}}
    return random_model(family, **eight.get(family, {"num_hidden_layers": 8}))


def _ids(b: int = 2, L: int = 7) -> torch.Tensor:
    return torch.randint(3, 320, (b, L), generator=torch.Generator().manual_seed(1))


def _ptrs(model: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in model.state_dict().values()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_reproduces_teacher(family: str) -> None:
    teacher = random_model(family)
    student, p = rewrite(teacher, [])
    with torch.no_grad():
        assert torch.equal(student(_ids()).logits, teacher(_ids()).logits)
    assert not p.replaced and p.total_after == p.total_before and p.nodes() == []
    assert not (_ptrs(student) & _ptrs(teacher))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hybrid_on_every_family(family: str) -> None:
    teacher = _eight(family)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, p = rewrite(teacher, HYBRID)

    # the plan: every 4th layer kept by rule 0, the rest replaced by rule 1
    assert [e.status for e in p.entries] == ["kept", "replaced", "replaced", "replaced"] * 2
    assert [e.rule_index for e in p.entries] == [0, 1, 1, 1] * 2
    assert all(e.params["n_heads"] == 4 and e.params["d_state"] == 16 for e in p.replaced)
    assert [n["layer"] for n in p.nodes()] == list(range(8))
    json.dumps(p.to_dict())
    assert "replaced 6" in p.to_text()

    # the student: mixers where planned, teacher attention elsewhere, forward runs
    for e in p.entries:
        assert isinstance(student.get_submodule(e.path), Mixer) is e.replaced
    with torch.no_grad():
        out = student(_ids()).logits
    assert out.shape == (2, 7, 320) and torch.isfinite(out).all()

    # every splice: FX graph retargeted to the student == eager student layer
    for block in trace_model(teacher).blocks:
        check = check_splice(block, student)
        assert check.ok, check

    # the teacher is untouched and shares no storage with the student
    assert not (_ptrs(student) & _ptrs(teacher))
    with torch.no_grad():
        for prm in student.parameters():
            prm.add_(1.0)
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt"])
def test_plan_on_meta_matches_rewrite(family: str) -> None:
    teacher = _eight(family)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(teacher.config)
    meta_plan = plan(skeleton, HYBRID)
    _, real_plan = rewrite(teacher, HYBRID)
    assert meta_plan.to_dict() == real_plan.to_dict()
    assert plan(teacher, HYBRID).to_dict() == real_plan.to_dict()
    assert all(not p.is_meta for p in teacher.parameters())


def test_rewrite_meta_skeleton() -> None:
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(random_model("llama").config)
    student, p = rewrite(skeleton, [{"mixer": MIX}])
    assert len(p.replaced) == 4 and all(t.is_meta for t in student.parameters())


def test_splice_rebuilds_from_nodes() -> None:
    teacher = random_model("qwen3")
    student, p = rewrite(teacher, [{"layers": [1, 3], "mixer": MIX}, {"mixer": "keep"}])
    rebuilt = splice(random_model("qwen3", seed=5), json.loads(json.dumps(p.nodes())))
    assert [type(m).__name__ for m in rebuilt.modules()] == [type(m).__name__ for m in student.modules()]
    rebuilt.load_state_dict(student.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(_ids()).logits, student(_ids()).logits)


def test_splice_unknown_path() -> None:
    with pytest.raises(surgery.SurgeryError, match="not an attention node"):
        splice(random_model("llama"), [{"path": "model.layers.9.self_attn", "layer": 9, "rule": MIX, "mixer": MIX, "params": {}}])


def test_replace_objects_and_training_mode() -> None:
    teacher = random_model("llama")
    rule = surgery.Replace(modules="model.layers.*.self_attn", layers="0:2", mixer=MIX, params={"d_state": 8})
    student, p = rewrite(teacher, [rule])
    assert isinstance(p, Plan) and [e.params["d_state"] for e in p.replaced] == [8, 8]
    assert not student.training and not student.model.layers[0].self_attn.training


def test_plan_text_alignment() -> None:
    p = plan(random_model("gpt2"), [{"layers": 0, "mixer": MIX}])
    lines = p.to_text().splitlines()
    assert lines[0].startswith("layer") and set(lines[1]) <= {"-", " "}
    assert "c_attn[:, 0:64].T" in lines[2]
    assert "(unchanged)" in lines[3]


def test_check_splices_and_a_stale_trace() -> None:
    from surgery.rewriter import check_splices

    teacher = random_model("opt")
    student, p = rewrite(teacher, [{"layers": "1:", "mixer": MIX}])
    assert [c.layer for c in check_splices(teacher, student, p)] == [1, 2, 3]
    # OPT's functional dropout is traced with training=False baked in: a student in
    # training mode (dropout active) no longer matches the graph, and the check says so
    student.config.dropout = 0.5
    for layer in student.model.decoder.layers:
        layer.dropout = 0.5
    student.train()
    with pytest.raises(AssertionError, match="splice check failed at model.decoder.layers.1"):
        check_splices(teacher, student, p)


def test_plan_survives_meta_unsafe_init(monkeypatch: pytest.MonkeyPatch) -> None:
    def value_reading_init(self, weights, init):  # noqa: ANN001, ANN202
        float(self.C_proj.weight.detach().sum())  # reads a value: fails on meta
        return {"C_proj.weight": "q"}

    monkeypatch.setattr(placeholder_mixer.PlaceholderLinear, "init_from_attention", value_reading_init)
    p = plan(random_model("llama"), [{"layers": 0, "mixer": MIX}])
    assert "meta" in next(iter(p.replaced[0].transfer.values()))
