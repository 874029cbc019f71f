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
    if view.position.kind == "rope":
        rd = view.position.rotary_dim
        kwargs["position_embeddings"] = (torch.ones(b, L, rd), torch.zeros(b, L, rd))
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


def test_registry_covers_every_random_family() -> None:
    assert set(FAMILIES) <= set(supported_families())


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
    q, k, v = _family_qkv(view, u)
    attn = view.module
    eq, ek, ev = _ours(w, u, "q"), _ours(w, u, "k"), _ours(w, u, "v")
    if view.qk_norm:  # Qwen3 / Gemma3: per-head norm before RoPE, over p
        qn = getattr(attn, "q_norm", None) or attn.q_layernorm
        kn = getattr(attn, "k_norm", None) or attn.k_layernorm
        eq, ek = qn(eq), kn(ek)
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
