"""Family adapters: the common head-major layout reproduces each family's own q/k/v.

q, k, v are captured *inside* the family's attention forward (a registered
attention implementation records what reaches the attention function), with
RoPE made the identity (cos = 1, sin = 0), and compared with the projections
computed from :class:`AttentionWeights`. This checks fused/transposed layouts
(GPT-2 Conv1D, GPT-NeoX per-head interleaving) against the real module, not
against a second copy of the adapter's own reading.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from rewrites.adapters import UnsupportedModelError, get_adapter, supported_families
from surgery.random_models import FAMILIES, random_model
from verify.capture import can_switch_attention

pytestmark = pytest.mark.hf_contract  # also run on the oldest supported and the newest transformers (.ci/run)


_CAPTURED: dict[str, torch.Tensor] = {}


class _Stop(Exception):
    pass


def _capture(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN003
    _CAPTURED.update(q=query, k=key, v=value)  # (b, h, L, p), (b, g, L, p)
    raise _Stop


AttentionInterface.register("surgery_capture", _capture)


def _family_qkv(view, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """q/k/v as the family's own attention forward computes them (identity RoPE)."""
    attn, config = view.module, view.adapter.config
    b, L, _ = u.shape
    kwargs = {"hidden_states": u, "attention_mask": None}
    if view.adapter.uses_position_embeddings:  # also NoPE layers of a RoPE model (SmolLM3): they ignore it
        rd = view.position.rotary_dim or view.shape.head_dim
        kwargs["position_embeddings"] = (torch.ones(b, L, rd), torch.zeros(b, L, rd))  # (cos, sin)
        if view.adapter.family in ("gptj", "codegen"):  # (sin, cos), one entry per rotated pair
            kwargs["position_embeddings"] = (torch.zeros(b, L, rd // 2), torch.ones(b, L, rd // 2))
    before = config._attn_implementation
    config._attn_implementation = "surgery_capture"
    try:
        with pytest.raises(_Stop):
            attn(**kwargs)
    finally:
        config._attn_implementation = before
    return _CAPTURED["q"], _CAPTURED["k"], _CAPTURED["v"]


def _ours(w, u: torch.Tensor, which: str) -> torch.Tensor:  # noqa: ANN001
    t, b = getattr(w, which), getattr(w, f"{which}_bias")
    out = torch.einsum("hpd,bld->bhlp", t, u)  # (b, h, L, p)
    return out if b is None else out + b[None, :, None, :]


def _normed(norm, t: torch.Tensor, scope: str | None) -> torch.Tensor:  # noqa: ANN001
    """Apply a family's q/k norm to ``t (b, h, L, p)`` the way its attention does."""
    b, h, L, p = t.shape
    if scope == "all_heads":  # OLMo2: over h*p, before the head split
        return norm(t.transpose(1, 2).reshape(b, L, h * p)).reshape(b, L, h, p).transpose(1, 2)
    if type(norm).__name__.startswith("Cohere"):  # weight (h, p), applied on (b, L, h, p)
        return norm(t.transpose(1, 2)).transpose(1, 2)
    return norm(t)  # (b, h, L, p), over p (StableLM: one norm per head along dim 1)


def test_registry_covers_every_random_family() -> None:
    assert set(FAMILIES) <= set(supported_families())


# families whose attention computes its softmax itself (no AttentionInterface to capture q/k/v from):
# their whole attention output is compared with one computed from AttentionWeights
OWN_SOFTMAX = {"falcon": "head_dim", "gpt_neo": "unscaled"}


def _reference_attention(w, u: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:  # noqa: ANN001
    """Causal softmax attention (no RoPE) from the common layout: u (b, L, d) -> (b, L, d)."""
    q, k, v = (_ours(w, u, n) for n in "qkv")  # (b, h, L, p), (b, g, L, p)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    L = u.shape[1]
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    if window is not None:
        allowed &= ~torch.ones(L, L, dtype=torch.bool).tril(-window)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    y = scores.softmax(-1) @ v  # (b, h, L, p)
    out = torch.einsum("dhp,bhlp->bld", w.o, y)
    return out if w.o_bias is None else out + w.o_bias


def _check_whole_attention(family: str, view, u: torch.Tensor) -> None:  # noqa: ANN001
    s, w = view.shape, view.weights()
    b, L, _ = u.shape
    scale = 1.0 if OWN_SOFTMAX.get(family) == "unscaled" else s.head_dim**-0.5
    mask = torch.full((L, L), torch.finfo(u.dtype).min).triu(1)[None, None].expand(b, 1, L, L)
    if family == "falcon":
        pe = (torch.ones(b, L, s.head_dim), torch.zeros(b, L, s.head_dim))  # identity RoPE
        theirs, _ = view.module(u, alibi=None, attention_mask=mask, position_embeddings=pe)
    elif family in ("gptj", "codegen"):  # transformers < 5.24: rotary from position_ids; position 0 rotates by 0
        theirs, _ = view.module(u, attention_mask=mask, position_ids=torch.zeros(b, L, dtype=torch.long))
    else:
        theirs, _ = view.module(u, attention_mask=None)
    torch.testing.assert_close(theirs, _reference_attention(w, u, scale, view.sliding_window), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_weights_reproduce_family_projections(family: str) -> None:
    model = random_model(family)
    adapter = get_adapter(model)
    views = adapter.attention_views()
    assert [v.layer for v in views] == list(range(len(views)))
    view = views[1]
    s = view.shape
    w = view.weights()
    u = torch.randn(2, 5, s.d_model, generator=torch.Generator().manual_seed(0))  # (b, L, d)
    if family in OWN_SOFTMAX or not can_switch_attention(model):
        u = torch.randn(2, 20, s.d_model, generator=torch.Generator().manual_seed(0))  # longer than the window
        for v in views:  # every layer: GPT-Neo alternates global and local attention
            _check_whole_attention(family, v, u)
        return
    q, k, v = _family_qkv(view, u)
    attn = view.module
    eq, ek, ev = _ours(w, u, "q"), _ours(w, u, "k"), _ours(w, u, "v")
    if view.qk_norm:  # norm before RoPE: per head (Qwen3, Gemma3, Cohere, StableLM) or over all heads (OLMo2)
        qn = getattr(attn, "q_norm", None) or attn.q_layernorm
        kn = getattr(attn, "k_norm", None) or attn.k_layernorm
        eq, ek = _normed(qn, eq, view.qk_norm_scope), _normed(kn, ek, view.qk_norm_scope)
    if family == "opt":  # OPT scales q inside the module
        eq = eq * attn.scaling
    assert q.shape == (2, s.n_heads, 5, s.head_dim) and k.shape == (2, s.n_kv_heads, 5, s.head_dim)
    torch.testing.assert_close(q, eq, rtol=0, atol=1e-6)
    torch.testing.assert_close(k, ek, rtol=0, atol=1e-6)
    torch.testing.assert_close(v, ev, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_projection_layout(family: str) -> None:
    """o (d, h, p) applied to per-head outputs equals the family's output projection."""
    model = random_model(family)
    view = get_adapter(model).attention_views()[0]
    s, w = view.shape, view.weights()
    y = torch.randn(3, s.n_heads, s.head_dim)  # per-head attention outputs
    ours = torch.einsum("dhp,bhp->bd", w.o, y) + (w.o_bias if w.o_bias is not None else 0)
    name = {"gpt2": "c_proj"}.get(family, view.adapter.o_name)
    theirs = view.module.get_submodule(name)(y.reshape(3, -1))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_geometry_and_positions() -> None:
    llama = get_adapter(random_model("llama")).attention_views()[0]
    assert (llama.shape.n_heads, llama.shape.n_kv_heads, llama.shape.group_size) == (4, 2, 2)
    assert llama.position.kind == "rope" and llama.position.rotary_dim == llama.shape.head_dim
    phi = get_adapter(random_model("phi")).attention_views()[0]
    assert phi.position.rotary_dim == phi.shape.head_dim // 2  # partial_rotary_factor 0.5
    assert get_adapter(random_model("gpt2")).attention_views()[0].position.kind == "learned"
    assert get_adapter(random_model("qwen3")).attention_views()[0].qk_norm
    assert not llama.qk_norm
    g3 = get_adapter(random_model("gemma3_text")).attention_views()[0]
    assert g3.sliding_window == 16 and g3.position.rope_theta == 10000.0
    sources = get_adapter(random_model("gpt2")).attention_views()[2].sources()
    assert sources["k"] == "transformer.h.2.attn.c_attn.weight[:, 64:128].T"


def test_weights_are_copies() -> None:
    view = get_adapter(random_model("llama")).attention_views()[0]
    w = view.weights()
    assert w.q.data_ptr() != view.module.q_proj.weight.data_ptr()


def test_unknown_family_lists_supported() -> None:
    model = random_model("gpt2")
    model.config.model_type = "gpt3"
    with pytest.raises(UnsupportedModelError, match="supported: .*gpt2"):
        get_adapter(model)


def test_llama_layout_variants_are_reported() -> None:
    """What each Llama-layout family changes is named in the node's info (plans and diffs show it)."""

    def info(family: str, layer: int = 0) -> dict:
        return get_adapter(random_model(family)).attention_views()[layer].info()

    assert info("olmo2")["qk_norm"] == "all_heads" and info("qwen3")["qk_norm"] == "head"
    assert info("stablelm")["qk_norm"] == "head" and info("cohere")["qk_norm"] == "head"
    assert info("llama")["qk_norm"] is False and info("llama")["adapter"] == "LlamaAdapter"
    assert info("glm")["position"] == {"kind": "rope", "rope_theta": 10000.0, "rotary_dim": 8, "rope_type": "default",
                                       "interleaved": True}
    assert info("stablelm")["position"]["rotary_dim"] == 8 and info("nemotron")["position"]["rotary_dim"] == 8
    assert info("smollm3", 0)["position"]["kind"] == "rope" and info("smollm3", 1)["position"] == {"kind": "none"}
    assert info("gemma2", 0)["sliding_window"] == 16 and info("gemma2", 1)["sliding_window"] is None
    assert [info("olmo3", i)["sliding_window"] for i in range(4)] == [16, 16, 16, None]
    assert info("starcoder2")["adapter"] == "LlamaAdapter"
    w = get_adapter(random_model("starcoder2")).attention_views()[0].weights()
    assert all(b is not None for b in (w.q_bias, w.k_bias, w.v_bias, w.o_bias))  # use_bias: all four


def test_no_structural_fallback() -> None:
    """A family without an adapter is refused even when its modules look like Llama's."""
    model = random_model("llama")
    model.config.model_type = "llama_lookalike"
    with pytest.raises(UnsupportedModelError, match="no attention adapter for model_type 'llama_lookalike'"):
        get_adapter(model)


@pytest.mark.parametrize(("family", "overrides", "kv_heads"), [
    ("falcon", {"new_decoder_architecture": False, "multi_query": True}, 1),  # Falcon 7B
    ("falcon", {"new_decoder_architecture": False, "multi_query": False, "num_kv_heads": 4}, 4),  # per head
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 1}, 1),
    ("falcon", {"bias": True}, 2),
])  # fmt: skip
def test_falcon_layouts(family: str, overrides: dict, kv_heads: int) -> None:
    view = get_adapter(random_model(family, **overrides)).attention_views()[1]
    assert view.shape.n_kv_heads == kv_heads
    u = torch.randn(2, 6, view.shape.d_model, generator=torch.Generator().manual_seed(3))
    _check_whole_attention(family, view, u)


def test_gpt_bigcode_without_multi_query() -> None:
    """multi_query=False: c_attn rows interleave per head, like GPT-NeoX."""
    view = get_adapter(random_model("gpt_bigcode", multi_query=False)).attention_views()[0]
    assert view.shape.n_kv_heads == 4
    u = torch.randn(1, 4, view.shape.d_model)
    q, k, v = _family_qkv(view, u)
    w = view.weights()
    for theirs, which in ((q, "q"), (k, "k"), (v, "v")):
        torch.testing.assert_close(theirs, _ours(w, u, which), rtol=1e-5, atol=1e-6)


def test_falcon_alibi_and_mpt_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedModelError, match="alibi=True .* would read them as padding"):
        get_adapter(random_model("falcon", alibi=True))
