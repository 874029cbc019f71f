"""Mixer params / init models: resolution against the teacher, clear errors, weight transfer."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from surgery.cache import SurgeryCache
from surgery.mixers import MIXERS, AttentionShape, AttentionWeights, get_mixer

pytestmark = pytest.mark.hf_contract  # also run on the oldest supported and the newest transformers (.ci/run)

GQA = AttentionShape(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8)
MHA = AttentionShape(d_model=32, n_heads=4, n_kv_heads=4, head_dim=8)


def build(name: str, shape: AttentionShape = GQA, **params: object):
    cls = get_mixer(name)
    return cls(shape.d_model, cls.resolve_params(cls.params_model(**params), shape), layer_idx=1)


def teacher_weights(shape: AttentionShape, bias: bool = False, seed: int = 0) -> AttentionWeights:
    g = torch.Generator().manual_seed(seed)
    s = shape

    def r(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=g)

    return AttentionWeights(
        shape=s,
        q=r(s.n_heads, s.head_dim, s.d_model),
        k=r(s.n_kv_heads, s.head_dim, s.d_model),
        v=r(s.n_kv_heads, s.head_dim, s.d_model),
        o=r(s.d_model, s.n_heads, s.head_dim),
        q_bias=r(s.n_heads, s.head_dim) if bias else None,
        k_bias=r(s.n_kv_heads, s.head_dim) if bias else None,
        v_bias=r(s.n_kv_heads, s.head_dim) if bias else None,
        o_bias=r(s.d_model) if bias else None,
    )


def test_registry_and_field_descriptions() -> None:
    assert {"discrete_mamba2", "mamba2"} <= set(MIXERS)
    with pytest.raises(KeyError, match="did you mean"):
        get_mixer("discrete_mamba")
    for cls in MIXERS.values():
        for model in (cls.params_model, cls.init_model):
            assert model.model_config["extra"] == "forbid"
            assert all(f.description for f in model.model_fields.values()), model.__name__


def test_discrete_resolution_gqa_and_mha() -> None:
    m = build("discrete_mamba2")
    p = m.params
    assert (p.n_v_heads, p.n_qk_heads, p.n_b_heads, p.head_dim, p.d_state) == (4, 4, 2, 8, 8)  # B per KV group
    assert build("discrete_mamba2", MHA).params.n_b_heads == 4
    assert build("discrete_mamba2", n_qk_heads=2).params.n_b_heads == 2  # C heads != teacher's: B follows C
    assert m.n_matrix_heads == 4 and m.d_inner == 32


def test_mamba2_resolution() -> None:
    p = build("mamba2").params
    assert (p.n_heads, p.head_dim, p.d_state, p.ngroups) == (4, 8, 8, 4)
    assert build("mamba2", ngroups=1, d_state=16).params.d_state == 16


ERRORS = [
    ("discrete_mamba2", {"d_state": 0}, "d_state"),
    ("discrete_mamba2", {"chunk_size": 0}, "chunk_size"),
    ("discrete_mamba2", {"d_conv": -1}, "d_conv"),
    ("discrete_mamba2", {"head_dim": -2}, "head_dim"),
    ("discrete_mamba2", {"n_v_heads": 6, "n_qk_heads": 4}, "n_v_heads"),
    ("discrete_mamba2", {"n_qk_heads": 4, "n_b_heads": 3}, "n_b_heads"),
    ("discrete_mamba2", {"nheads": 4}, "nheads"),
    ("mamba2", {"d_state": 0}, "d_state"),
    ("mamba2", {"chunk_size": 0}, "chunk_size"),
    ("mamba2", {"n_heads": 4, "ngroups": 3}, "ngroups"),
    ("mamba2", {"norm_eps": 0}, "norm_eps"),
]


@pytest.mark.parametrize(("name", "params", "field"), ERRORS)
def test_bad_params_raise_naming_the_parameter(name: str, params: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        get_mixer(name).params_model(**params)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_unresolved_or_incompatible_params_fail_at_construction(name: str) -> None:
    cls = get_mixer(name)
    with pytest.raises(ValueError, match="is not set"):
        cls(32, cls.params_model(), layer_idx=0)
    heads = "n_v_heads" if name == "discrete_mamba2" else "n_heads"
    bad = 0 if name == "toeplitz" else 3  # toeplitz heads have no groups to divide: any positive count fits
    with pytest.raises(ValueError, match=heads):
        cls(32, {**build(name).params.model_dump(), heads: bad}, layer_idx=0)
    with pytest.raises(ValueError, match="d_model"):
        cls(0, build(name).params, layer_idx=0)


def test_init_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="dt_max"):
        get_mixer("mamba2").init_model(dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match="q_to_C"):
        build("discrete_mamba2").init_from_attention(None, get_mixer("discrete_mamba2").init_model(q_to_C=True))


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_transfer_q_k_v_o_with_gqa_expansion(name: str) -> None:
    cls = get_mixer(name)
    extra = {"n_b_heads": 4} if name in ("discrete_mamba2", "low_rank", "semiseparable") else {}  # B per query head
    m = build(name, **extra)
    w = teacher_weights(GQA)
    qk = name != "toeplitz"  # a Toeplitz kernel is input-independent: nothing takes Q or K
    flags = {"q_to_C": True, "k_to_B": True} if qk else {}
    record = m.init_from_attention(w, cls.init_model(**flags, v_to_x=True, o_to_out=True))
    views = m.weight_views()
    group = [0, 0, 1, 1]
    assert torch.equal(views["x"], w.v[group])
    assert torch.equal(views["out"], w.o)
    assert record["x_proj[h=4]"] == "v[h=2] repeated x2 per group"
    assert record["out_proj"] == "o[h=4]"
    if not qk:
        assert set(views) == {"x", "out"} and "q_to_C" not in cls.init_model.model_fields
        return
    assert torch.equal(views["C"], w.q)
    assert torch.equal(views["B"], w.k[group])
    assert record["C_proj[h=4]"] == "q[h=4]"
    assert record["B_proj[h=4]"] == "k[h=2] repeated x2 per group"
    # views are views: writing through them changes the mixer
    with torch.no_grad():
        views["C"][0, 0, 0] = 123.0
    assert m.C_proj.weight[0, 0] == 123.0


def test_transfer_b_per_kv_group_and_biases() -> None:
    cls = get_mixer("discrete_mamba2")
    m = build("discrete_mamba2", bias=True)  # n_b_heads resolves to the 2 KV heads
    w = teacher_weights(GQA, bias=True)
    record = m.init_from_attention(w, cls.init_model(k_to_B=True, q_to_C=True, o_to_out=True))
    assert torch.equal(m.weight_views()["B"], w.k)
    assert torch.equal(m.B_proj.bias.view(2, 8), w.k_bias)
    assert torch.equal(m.C_proj.bias.view(4, 8), w.q_bias)
    assert torch.equal(m.out_proj.bias, w.o_bias)
    assert record["B_proj[h=2]"] == "k[h=2]"
    no_bias = build("discrete_mamba2")
    rec = no_bias.init_from_attention(w, cls.init_model(k_to_B=True))
    assert "bias dropped" in rec["B_proj[h=2]"]


@pytest.mark.parametrize(
    ("name", "params", "option", "field"),
    [
        ("discrete_mamba2", {"d_state": 4}, "k_to_B", "d_state"),
        ("discrete_mamba2", {"d_state": 4}, "q_to_C", "d_state"),
        ("discrete_mamba2", {"n_qk_heads": 2}, "q_to_C", "n_qk_heads"),
        ("discrete_mamba2", {"head_dim": 4}, "v_to_x", "head_dim"),
        ("discrete_mamba2", {"n_v_heads": 8, "head_dim": 4}, "o_to_out", "heads"),
        ("mamba2", {"ngroups": 1}, "q_to_C", "ngroups"),
        ("mamba2", {"d_state": 16}, "k_to_B", "d_state"),
        ("mamba2", {"head_dim": 16}, "o_to_out", "head_dim"),
    ],
)
def test_transfer_needs_matching_dims(name: str, params: dict, option: str, field: str) -> None:
    cls = get_mixer(name)
    m = build(name, **params)
    with pytest.raises(ValueError, match=field) as err:
        m.init_from_attention(teacher_weights(GQA), cls.init_model(**{option: True}))
    assert option in str(err.value)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_forward_accepts_every_family_call_contract(name: str) -> None:
    m = build(name)
    u = torch.randn(2, 5, 32)
    want = m.mix(u)
    out, weights = m(u, past_key_values=None, attention_mask=None, use_cache=False)  # gpt2: positional
    assert weights is None and torch.allclose(out, want)
    out, _ = m(hidden_states=u, position_embeddings=(u, u), position_ids=None)  # llama family
    assert torch.allclose(out, want)
    cache = DynamicCache()  # empty caches are falsy (len 0): must still be used
    out, _ = m(u, layer_past=cache, attention_mask=None)  # gpt_neox
    assert torch.allclose(out, want)
    assert isinstance(cache, SurgeryCache)  # upgraded in place
    assert cache.get_seq_length(1) == 5 and cache.get_seq_length() == 5  # layer 0 never ran: any layer's length
