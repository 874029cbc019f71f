"""The student's tensors in ``BambaForCausalLM``'s names and layout.

Renames (Llama layout -> Bamba)::

    model.norm                              -> model.final_layernorm
    model.layers.i.post_attention_layernorm -> model.layers.i.pre_ff_layernorm
    model.layers.i.mlp.*                    -> model.layers.i.feed_forward.*
    model.layers.i.self_attn.{q,k,v,o}_proj -> unchanged (kept attention)

A ``mamba2`` mixer at ``model.layers.i.self_attn`` becomes ``model.layers.i.mamba`` (``d_inner =
h p``, ``g`` groups, state ``n``, ``h`` heads, ``d`` model width)::

    in_proj.weight  (2 d_inner + 2 g n + h, d) = [z_proj | x_proj | B_proj | C_proj | dt_proj]
    conv1d.weight   (d_inner + 2 g n, 1, k)     = [conv_x | conv_bc]    (conv_bc is already [B | C])
    conv1d.bias                                  = [conv_x | conv_bc]
    dt_bias, A_log, D (h,), out_proj            unchanged;  norm.weight (d_inner,) = norm_weight

A fully converted student's appended identity attention layer (see :mod:`surgery.native.bamba`)
is all zeros but its norm weights. Every stored tensor of the student is placed exactly once (one left over is an error naming it);
the result is checked against the names and shapes of a ``BambaForCausalLM`` built from the
config on the meta device, where biases the student lacks (Qwen2's o_proj) are zeros: exactly
"no bias".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..student.tensors import named_tensors
from .source import Student
from .target import ExportError

Take = Callable[[str], torch.Tensor | None]  # a student tensor by name, marked as placed (None: not stored)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def mamba2_mixer(take: Take, src: str) -> dict[str, torch.Tensor]:
    """Bamba's ``mamba.*`` tensors from the mamba2 mixer stored under ``src`` (``bias=False``: no projection biases)."""

    def need(name: str) -> torch.Tensor:
        t = take(f"{src}.{name}")
        if t is None:
            raise ExportError(f"the student has no tensor {src}.{name}; its directory is incomplete")
        return t

    out = {
        "in_proj.weight": torch.cat([need(f"{p}.weight") for p in ("z_proj", "x_proj", "B_proj", "C_proj", "dt_proj")]),
        "conv1d.weight": torch.cat([need("conv_x.weight"), need("conv_bc.weight")]),  # (d_inner + 2 g n, 1, k)
        "dt_bias": need("dt_bias"),
        "A_log": need("A_log"),
        "D": need("D"),
        "norm.weight": need("norm_weight"),
        "out_proj.weight": need("out_proj.weight"),
    }
    conv_bias = [take(f"{src}.conv_x.bias"), take(f"{src}.conv_bc.bias")]
    if all(b is not None for b in conv_bias):
        out["conv1d.bias"] = torch.cat(conv_bias)
    return out


def bamba_tensors(student: Student, config: Any, identity: list[int]) -> dict[str, torch.Tensor]:
    """``{Bamba name: tensor}`` for the student (see the module docstring); ``config`` is the ``BambaConfig``.

    ``identity``: indices of the appended identity attention layers (all projections zero, norms one).
    """
    stored = student.tensors()
    placed: set[str] = set()

    def take(name: str) -> torch.Tensor | None:
        if name not in stored:
            return None
        placed.add(name)
        return stored[name].detach()

    def copy(src: str, dst: str) -> None:
        t = take(src)
        if t is not None:
            out[dst] = t

    out: dict[str, torch.Tensor] = {}
    copy("model.embed_tokens.weight", "model.embed_tokens.weight")
    copy("model.norm.weight", "model.final_layernorm.weight")
    copy("lm_head.weight", "lm_head.weight")  # absent when tied: Bamba ties it too
    mixers = student.mixers
    for i in range(student.n_layers):
        layer = f"model.layers.{i}"
        copy(f"{layer}.input_layernorm.weight", f"{layer}.input_layernorm.weight")
        copy(f"{layer}.post_attention_layernorm.weight", f"{layer}.pre_ff_layernorm.weight")
        for proj in MLP:
            for kind in ("weight", "bias"):
                copy(f"{layer}.mlp.{proj}.{kind}", f"{layer}.feed_forward.{proj}.{kind}")
        if i in mixers:
            for name, t in mamba2_mixer(take, mixers[i][0]).items():
                out[f"{layer}.mamba.{name}"] = t
        else:
            for proj in ATTENTION:
                for kind in ("weight", "bias"):
                    copy(f"{layer}.self_attn.{proj}.{kind}", f"{layer}.self_attn.{proj}.{kind}")
    left = sorted(set(stored) - placed)
    if left:
        raise ExportError(f"the student's tensor {left[0]}" + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
                          + " has no place in BambaForCausalLM; exporting without it would change the model")
    return _match_native(out, config, identity, stored["model.embed_tokens.weight"].dtype)


def _match_native(out: dict[str, torch.Tensor], config: Any, identity: list[int], dtype: torch.dtype
                  ) -> dict[str, torch.Tensor]:
    """Check names and shapes against ``BambaForCausalLM(config)`` (meta device); absent biases become zeros,
    the identity layers zeros (norm weights one)."""
    from transformers import BambaForCausalLM

    with torch.device("meta"):
        native = BambaForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in named_tensors(native)}
    for i in identity:
        for name, shape in expected.items():
            if name.startswith(f"model.layers.{i}."):
                out[name] = (torch.ones if name.endswith("layernorm.weight") else torch.zeros)(shape, dtype=dtype)
    extra = sorted(set(out) - set(expected))
    if extra:
        raise ExportError(f"tensor {extra[0]} has no place in BambaForCausalLM for this config")
    for name, shape in expected.items():
        if name not in out:
            if not name.endswith(".bias"):
                raise ExportError(f"BambaForCausalLM needs {name}, which the student has no source for")
            weight = out[name[: -len("bias")] + "weight"]
            out[name] = weight.new_zeros(shape)  # no bias == a zero bias
        elif tuple(out[name].shape) != shape:
            raise ExportError(f"{name} has shape {tuple(out[name].shape)}, BambaForCausalLM expects {shape}")
    return {name: out[name] for name in expected}  # in the native state-dict order
