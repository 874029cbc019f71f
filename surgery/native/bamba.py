"""Export target ``bamba``: a Llama-layout student with ``mamba2`` mixers -> transformers' ``BambaForCausalLM``.

Bamba (IBM, transformers ``models/bamba``) is a Llama decoder (RMSNorm, RoPE + GQA attention,
SwiGLU MLP) whose layers are either attention (``attn_layer_indices``) or a Mamba-2 mixer with
one config for all mixer layers. What it computes, checked against transformers 5.17 and 5.24:

* the mixer is exactly surgery's ``mamba2`` (:mod:`surgery.mixers.mamba2`) without projection
  biases (Bamba zeroes a padding token's input, surgery its projections): ``in_proj`` =
  ``[z | x | B | C | dt]``, one depthwise causal conv over ``[x | B | C]`` with
  ``config.hidden_act`` as activation, ``dt = softplus(dt + dt_bias)``, ``A = -exp(A_log)``,
  D skip, ``rmsnorm(y * silu(z)) * weight`` with ``config.rms_norm_eps``, ``out_proj``
  (layout: :mod:`surgery.native.bamba_tensors`);
* the gated RMSNorm is per B/C group (group size ``d_inner / ngroups``) from transformers 5.23
  on, over all ``d_inner`` channels before: a student with ``ngroups > 1`` is exact only there;
* attention is Llama's with RoPE over the whole head (``partial_rotary_factor`` 1), one
  ``attention_bias`` flag for q/k/v/o and no q/k norms or sliding window;
* ``generate`` with a cache fails when no layer is attention (transformers 5.17-5.24: the causal
  mask asks the cache for its length, and a cache of Mamba layers only raises), so a fully
  converted student gets one *identity* layer appended: an attention layer whose projections and
  MLP are all zeros adds exactly 0 to the residual stream (``h + 0 + 0 == h`` bit for bit), and its
  KV cache lets the cache report its length. It costs one small layer's weights and KV cache.

:meth:`BambaTarget.mismatches` names every way a student falls outside that.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..mixers.mamba2 import Mamba2
from .bamba_tensors import bamba_tensors
from .source import Student
from .target import Target, register_target

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # the Llama decoder layout: model.layers.i.{self_attn, mlp}
MIXER = "mamba2"
# mamba2 params Bamba holds once for all mixer layers (chunk_size changes speed only, not results)
SHARED_PARAMS = ("n_heads", "head_dim", "d_state", "ngroups", "d_conv", "conv_bias", "bias", "norm_eps")
GROUPED_NORM_SINCE = "5.23.0"  # BambaRMSNormGated(group_size=...): per-group gated RMSNorm
OLDEST_TESTED = "5.17.0"
DISCRETE_MAMBA2_WHY = (
    "no native transformers architecture computes discrete_mamba2: its input enters the state as x B^T "
    "(not dt x B^T), its conv has no activation, it has no gated RMSNorm and its gate has a bias, while "
    "Bamba, NemotronH, FalconH1, GraniteMoeHybrid, Zamba2 and Mamba2 all use the dt-scaled Mamba-2 mixer; "
    "export a student made with mixer: mamba2 (README, 'Serving a student')"
)


def grouped_gated_norm() -> bool:
    """Whether the installed transformers' Bamba normalises its gated RMSNorm per group (5.23 on)."""
    from transformers.models.bamba import modeling_bamba

    return "group_size" in inspect.signature(modeling_bamba.BambaRMSNormGated.__init__).parameters


def _layers(layers: list[int]) -> str:
    return f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"


def _has_bias(student: Student, layers: list[int], attr: str, projections: tuple[str, ...]) -> bool:
    """Whether any of ``projections`` of ``layers[i].<attr>`` has a bias (Bamba has one flag for all of them)."""
    blocks = student.model.model.layers
    return any(getattr(getattr(blocks[i], attr), p).bias is not None for i in layers for p in projections)


@register_target("bamba")
class BambaTarget(Target):
    """``BambaForCausalLM``: Llama-layout attention layers + Mamba-2 mixer layers (see the module docstring)."""

    model_type = "bamba"
    architecture = "BambaForCausalLM"

    # ------------------------------------------------------------------ what Bamba cannot express

    def mismatches(self, student: Student) -> list[str]:
        cfg = student.config
        if student.family not in FAMILIES:
            return [f"family {student.family!r}: Bamba has the Llama decoder layout; exportable families: "
                    f"{', '.join(FAMILIES)}"]
        mixers = student.mixers
        if not mixers:
            return ["no attention node was replaced: the student computes what its teacher does; "
                    "use the teacher's own checkpoint"]
        out = self._mixer_mismatches(student)
        if cfg.hidden_act != "silu":
            out.append(f"hidden_act {cfg.hidden_act!r}: Bamba applies config.hidden_act to both the MLP and the "
                       "mixer's conv, and the mamba2 conv uses silu")
        out += self._attention_mismatches(student)
        return out

    def _mixer_mismatches(self, student: Student) -> list[str]:
        out = []
        mixers = student.mixers
        misplaced = [i for i, (path, _) in mixers.items() if path != f"model.layers.{i}.self_attn"]
        if misplaced:
            out.append(f"mixers outside model.layers.<i>.self_attn ({_layers(misplaced)}): Bamba has no place for them")
        other = sorted(i for i, (_, m) in mixers.items() if m.name != MIXER)
        for name in sorted({mixers[i][1].name for i in other}):
            layers = [i for i in other if mixers[i][1].name == name]
            why = DISCRETE_MAMBA2_WHY if name == "discrete_mamba2" else f"Bamba's mixer is {MIXER}"
            out.append(f"mixer {name!r} in {_layers(layers)}: {why}")
        mamba = {i: m for i, (_, m) in mixers.items() if m.name == MIXER}
        if not mamba:
            return out
        for field in SHARED_PARAMS:
            values: dict[Any, list[int]] = {}
            for i, m in sorted(mamba.items()):
                values.setdefault(getattr(m.params, field), []).append(i)
            if len(values) > 1:
                seen = "; ".join(f"{v} in {_layers(ls)}" for v, ls in values.items())
                out.append(f"mamba2 params.{field} differs between layers ({seen}): Bamba has one mixer config for all")
        p = next(iter(mamba.values())).params
        d_model = student.config.hidden_size
        if p.bias:
            out.append("mamba2 params.bias is true: Bamba zeroes a padding token's mixer input, not its projections, so "
                       "in_proj's bias would reach the conv of the next real tokens and left-padded batches would "
                       "differ from the student; export students made with bias: false (the default)")
        if p.d_conv == 0:
            out.append("mamba2 params.d_conv is 0 (no conv): Bamba's mixer always has its conv")
        if (p.n_heads * p.head_dim) % d_model:
            out.append(f"mamba2 n_heads x head_dim = {p.n_heads * p.head_dim} is not a multiple of hidden_size "
                       f"{d_model}: Bamba sizes its mixer as mamba_expand x hidden_size with an integer mamba_expand")
        if p.norm_eps != student.config.rms_norm_eps:
            out.append(f"mamba2 params.norm_eps {p.norm_eps:g} differs from the teacher's rms_norm_eps "
                       f"{student.config.rms_norm_eps:g}: Bamba's gated norm uses rms_norm_eps; rewrite with "
                       f"params: {{norm_eps: {student.config.rms_norm_eps:g}}}")
        if p.ngroups > 1 and not grouped_gated_norm():
            import transformers

            out.append(f"mamba2 params.ngroups is {p.ngroups}: the student's gated RMSNorm is per group, but the "
                       f"installed transformers {transformers.__version__} normalises Bamba's over all channels "
                       f"(per group from {GROUPED_NORM_SINCE}); export with transformers >= {GROUPED_NORM_SINCE}, "
                       "or use ngroups: 1")
        return out

    def _attention_mismatches(self, student: Student) -> list[str]:
        kept = student.attention_layers
        if not kept:
            return []
        cfg = student.config
        out = []
        blocks = student.model.model.layers
        normed = [i for i in kept if any(hasattr(blocks[i].self_attn, n) for n in ("q_norm", "k_norm"))]
        if normed:
            out.append(f"kept attention in {_layers(normed)} has q/k norms ({student.family}): Bamba's attention has "
                       "none; replace every attention layer (a fully converted student exports)")
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types:
            sliding = [i for i in kept if layer_types[i] != "full_attention"]
        else:
            sliding = kept if getattr(cfg, "sliding_window", None) is not None else []
        if sliding:
            out.append(f"kept attention in {_layers(sliding)} uses a sliding window ({getattr(cfg, 'sliding_window', None)}"
                       "): Bamba's attention is full causal")
        rope = cfg.rope_parameters or {}
        if "rope_type" not in rope:
            out.append(f"rope_parameters {rope}: one RoPE for all layers is needed (Bamba has one rotary embedding)")
        elif rope.get("partial_rotary_factor", 1.0) != 1.0:
            out.append(f"partial_rotary_factor {rope['partial_rotary_factor']}: the teacher's attention rotates the "
                       "whole head here")
        return out

    # ------------------------------------------------------------------ the native checkpoint

    def config(self, student: Student) -> dict[str, Any]:
        cfg = student.config
        mamba: list[Mamba2] = [m for _, m in student.mixers.values()]
        p = mamba[0].params
        kept = student.attention_layers
        every = list(range(student.n_layers))
        rope = {**(cfg.rope_parameters or {}), "partial_rotary_factor": 1.0}
        anchor = self.identity_layers(student)
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": student.n_layers + len(anchor),
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "hidden_act": cfg.hidden_act,
            "initializer_range": cfg.initializer_range,
            "rms_norm_eps": cfg.rms_norm_eps,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
            "pad_token_id": cfg.pad_token_id,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "attention_dropout": float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
            "attention_bias": _has_bias(student, kept, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            "mlp_bias": _has_bias(student, every, "mlp", ("gate_proj", "up_proj", "down_proj")),
            "rope_parameters": rope,
            "attn_layer_indices": kept + anchor,
            "mamba_n_heads": p.n_heads,
            "mamba_d_head": p.head_dim,
            "mamba_n_groups": p.ngroups,
            "mamba_d_state": p.d_state,
            "mamba_d_conv": p.d_conv,
            "mamba_expand": p.n_heads * p.head_dim // cfg.hidden_size,
            "mamba_chunk_size": max(m.params.chunk_size for m in mamba),
            "mamba_conv_bias": p.conv_bias,
            "mamba_proj_bias": p.bias,
            "dtype": student.section.get("dtype", "float32"),
        }

    def tensors(self, student: Student, config: Any) -> dict[str, torch.Tensor]:
        return bamba_tensors(student, config, self.identity_layers(student))

    def identity_layers(self, student: Student) -> list[int]:
        """A fully converted student gets one identity attention layer appended (see the module docstring)."""
        return [] if student.attention_layers else [student.n_layers]

    def min_transformers(self, student: Student) -> str:
        grouped = any(m.params.ngroups > 1 for _, m in student.mixers.values())
        return GROUPED_NORM_SINCE if grouped else OLDEST_TESTED

    def notes(self, student: Student) -> list[str]:
        """What vLLM's own Bamba implementation (``vllm/model_executor/models/bamba.py``, as read) does not build."""
        config = self.config(student)
        notes = []
        if config["attention_bias"] or config["mlp_bias"]:
            notes.append("this export has attention or MLP biases; vLLM's Bamba builds its attention and MLP "
                         "without biases (and skips bias tensors when loading): check that your vLLM loads them")
        if student.attention_layers and config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]:
            notes.append(f"attention head_dim {config['head_dim']} is not hidden_size / num_attention_heads; vLLM's "
                         "Bamba derives the head size from those two: check that your vLLM reads head_dim")
        return notes
