"""Tiny randomly initialised decoders of every supported family (``random:<family>``).

Used by tests, dry runs and ``recipes/tiny.yaml``: 4 layers, d_model 64,
4 query heads and (where the family has grouped-query attention) 2 key/value
heads, a 320-entry vocabulary matching :func:`surgery.tokenizers.byte_tokenizer`.
:data:`LLAMA_LAYOUT` and :data:`FUSED_LAYOUT` name the families added for teacher
coverage, each configured with the options that set it apart switched on.
Weights come from the family's own initialiser under a fixed per-family seed,
so ``random:llama`` is the same model in every process.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

VOCAB_SIZE = 320  # 256 bytes + specials, padded to a multiple of 64
N_LAYERS = 4
D_MODEL = 64
N_HEADS = 4
N_KV_HEADS = 2
FFN = 128
MAX_POSITIONS = 2048

_COMMON: dict[str, Any] = {"vocab_size": VOCAB_SIZE, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": D_MODEL,
    "intermediate_size": FFN,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": N_HEADS,
    "num_key_value_heads": N_KV_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
    "tie_word_embeddings": False,
}

HEAD_DIM = D_MODEL // N_HEADS
# The Llama-layout families (``model.layers.i.self_attn.{q,k,v,o}_proj``), each with the options that make its
# attention differ from Llama's switched on (biases, q/k norms, partial RoPE, soft-capping, windows, NoPE layers),
# so that the tests meet them; ``layer_types=None`` lets the config derive the list for N_LAYERS.
_MOE: dict[str, Any] = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
LLAMA_LAYOUT: dict[str, dict[str, Any]] = {
    "starcoder2": {"use_bias": True, "sliding_window": None},
    "olmo": {"clip_qkv": 8.0},
    "olmo2": {},  # q_norm/k_norm over all heads at once (n_heads * head_dim)
    "olmo3": {"sliding_window": 16, "layer_types": None},
    "stablelm": {"qk_layernorm": True, "use_qkv_bias": True, "partial_rotary_factor": 0.5},
    "cohere": {"use_qk_norm": True, "tie_word_embeddings": True},  # interleaved RoPE, q/k LayerNorm per head
    "granite": {"attention_multiplier": 0.2, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                "logits_scaling": 2.0},
    "gemma2": {"sliding_window": 16, "layer_types": None, "query_pre_attn_scalar": HEAD_DIM},  # soft-capping
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen2_moe": {**_MOE, "num_experts": 4, "shared_expert_intermediate_size": 64, "layer_types": None},
    "qwen3_moe": {**_MOE, "num_experts": 4},
    "nemotron": {"partial_rotary_factor": 0.5},
    "glm": {"partial_rotary_factor": 0.5, "attention_bias": True},  # interleaved partial RoPE
    "helium": {},
    "smollm3": {"no_rope_layer_interval": 2, "no_rope_layers": None, "layer_types": None},  # NoPE every 2nd layer
}

_GPT_NAMES: dict[str, Any] = {"n_embd": D_MODEL, "n_layer": N_LAYERS, "n_head": N_HEADS, "n_positions": MAX_POSITIONS,
                               "n_inner": FFN}
_NO_DROPOUT: dict[str, Any] = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
# Families with fused or differently named projections (one adapter module each in rewrites/adapters/)
FUSED_LAYOUT: dict[str, dict[str, Any]] = {
    "phi3": dict(_LLAMA_LIKE, partial_rotary_factor=0.5),  # qkv_proj [q | k | v] with GQA
    "persimmon": {"hidden_size": D_MODEL, "intermediate_size": FFN, "num_hidden_layers": N_LAYERS,
                  "num_attention_heads": N_HEADS, "max_position_embeddings": MAX_POSITIONS, "qk_layernorm": True,
                  "partial_rotary_factor": 0.5},  # query_key_value interleaved per head
    "gpt_bigcode": dict(_GPT_NAMES, multi_query=True, **_NO_DROPOUT),  # c_attn [q | k | v], one K/V head
    "gptj": dict(_GPT_NAMES, rotary_dim=8, **_NO_DROPOUT),  # attn.{q,k,v,out}_proj, interleaved partial RoPE
    "codegen": dict(_GPT_NAMES, n_ctx=MAX_POSITIONS, rotary_dim=8, **_NO_DROPOUT),  # qkv_proj in 4 permuted blocks
    "gpt_neo": {"hidden_size": D_MODEL, "num_layers": N_LAYERS, "num_heads": N_HEADS, "intermediate_size": FFN,
                "attention_types": [[["global", "local"], N_LAYERS // 2]], "window_size": 16,
                "max_position_embeddings": MAX_POSITIONS},  # attn.attention.*, unscaled, local windows
    "falcon": {"hidden_size": D_MODEL, "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS,
               "num_kv_heads": N_KV_HEADS, "new_decoder_architecture": True, "alibi": False, "bias": False,
               "ffn_hidden_size": FFN, "max_position_embeddings": MAX_POSITIONS},  # query_key_value per KV group
}

# model_type -> config kwargs (AutoConfig.for_model(model_type, **kwargs))
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(_LLAMA_LIKE),
    "qwen2": dict(_LLAMA_LIKE),
    "qwen3": dict(_LLAMA_LIKE, head_dim=D_MODEL // N_HEADS),
    "mistral": dict(_LLAMA_LIKE, sliding_window=None),
    "gemma": dict(_LLAMA_LIKE, head_dim=D_MODEL // N_HEADS),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=D_MODEL // N_HEADS, sliding_window=16, layer_types=None),
    "phi": {
        "hidden_size": D_MODEL,
        "intermediate_size": FFN,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_HEADS,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": MAX_POSITIONS,
    },
    "gpt_neox": {
        "hidden_size": D_MODEL,
        "intermediate_size": FFN,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS,
        "rotary_pct": 0.5,
        "max_position_embeddings": MAX_POSITIONS,
        "use_parallel_residual": True,
    },
    "gpt2": {"n_embd": D_MODEL, "n_layer": N_LAYERS, "n_head": N_HEADS, "n_positions": MAX_POSITIONS, "n_inner": FFN},
    **{name: dict(_LLAMA_LIKE, head_dim=HEAD_DIM, **extra) for name, extra in LLAMA_LAYOUT.items()},
    **FUSED_LAYOUT,
    "opt": {
        "hidden_size": D_MODEL,
        "ffn_dim": FFN,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "word_embed_proj_dim": D_MODEL,
        "enable_bias": True,
    },
}

ALIASES = {"gemma3": "gemma3_text", "neox": "gpt_neox", "gptneox": "gpt_neox"}


def family_names() -> list[str]:
    """Names accepted after ``random:`` (aliases included)."""
    return sorted(set(FAMILIES) | set(ALIASES))


def canonical_family(name: str) -> str:
    """``gemma3`` -> ``gemma3_text``; raises ``KeyError`` for unknown families."""
    name = ALIASES.get(name, name)
    if name not in FAMILIES:
        raise KeyError(name)
    return name


def random_config(family: str, **overrides: Any) -> PretrainedConfig:
    """Tiny config of ``family`` (see :data:`FAMILIES`), eager attention."""
    model_type = canonical_family(family)
    kwargs = {**_COMMON, **FAMILIES[model_type], **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    return config


def random_model(family: str, seed: int | None = None, **overrides: Any) -> PreTrainedModel:
    """A tiny random causal LM of ``family`` in eval mode, float32, deterministic per family and seed."""
    config = random_config(family, **overrides)
    if seed is None:
        seed = zlib.crc32(canonical_family(family).encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
