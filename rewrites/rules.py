"""The built-in rewrite rules: one per registered mixer, plus ``keep``.

A mixer rule's ``params``/``init`` models are the mixer's own. Its build:

1. resolve ``params`` against the teacher node's :class:`AttentionShape`
   (``Mixer.resolve_params``: teacher-dependent defaults filled in);
2. construct the mixer on the teacher's device (``meta`` for plans) and dtype;
3. ``init_from_attention(view.weights() if a transfer is requested else None, init)``;
4. return ``(mixer, transfer record)``, the record's sources named as teacher tensors.

``keep`` leaves the attention in place (hybrids); its build returns a deep copy.

Whether ``init`` requests a transfer is asked of the mixer class
(``wants_attention_weights(init) -> bool`` if it defines one); otherwise any
``init`` option named like a transfer (``q_to_C``, ``k_to_B``, ``transfer``,
``from_attention``, ...; see :func:`transfer_fields`) with a truthy value other
than ``"none"`` counts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from surgery.mixers import MIXERS, Mixer, MixerInit, MixerParams

from .adapters import AttentionView
from .registry import RULES, register_rule
from .rule_options import KeepInit, KeepParams

_OFF = {"", "none", "no", "off", "false", "random", "default"}


_TRANSFER_FIELD = re.compile(r"transfer|from_attention|^(q|k|v|o|qk|kv|qkv|qkvo)(_to_|_from|$)")


def transfer_fields(init_model: type[MixerInit]) -> list[str]:
    """Names of ``init`` options that request weight transfer (``q_to_C``, ``transfer``, ...)."""
    return [name for name in init_model.model_fields if _TRANSFER_FIELD.search(name)]


def transfer_requested(mixer_cls: type[Mixer], init: MixerInit) -> bool:
    """True when ``init`` asks to copy any teacher attention weight (see module docstring)."""
    ask = getattr(mixer_cls, "wants_attention_weights", None)
    if callable(ask):
        return bool(ask(init))
    fields = set(transfer_fields(type(init)))
    for name, value in init.model_dump().items():
        if name not in fields:
            continue
        if isinstance(value, str):
            if value.strip().lower() not in _OFF:
                return True
        elif isinstance(value, dict):
            if any(v not in (None, False, "none") for v in value.values()):
                return True
        elif value:
            return True
    return False


_SOURCE = re.compile(r"^(q_bias|k_bias|v_bias|o_bias|q|k|v|o)\b")


def name_sources(record: dict[str, str], view: AttentionView) -> dict[str, str]:
    """``{"C_proj.weight": "q"}`` -> ``{"<path>.C_proj.weight": "<path>.q_proj.weight"}``."""
    sources = view.sources()
    out = {}
    for target, src in record.items():
        m = _SOURCE.match(src)
        named = sources[m.group(1)] + src[m.end() :] if m and m.group(1) in sources else src
        out[f"{view.path}.{target}"] = named
    return out


def build_mixer(mixer_cls: type[Mixer], view: AttentionView, params: Any, init: Any) -> tuple[nn.Module, dict[str, str]]:
    """Build ``mixer_cls`` for ``view`` (resolve, construct on the view's device/dtype, transfer)."""
    p = params if isinstance(params, MixerParams) else mixer_cls.params_model.model_validate(params or {})
    i = init if isinstance(init, MixerInit) else mixer_cls.init_model.model_validate(init or {})
    shape = view.shape
    try:
        p = mixer_cls.resolve_params(p, shape)
    except ValueError as err:
        from surgery.errors import SelectionError

        raise SelectionError(f"{view.path}: mixer {mixer_cls.name!r} cannot take this node: {err}") from None
    with torch.device(view.device):
        mixer = mixer_cls(shape.d_model, p, view.layer)
    mixer = mixer.to(dtype=view.dtype) if view.dtype.is_floating_point else mixer
    weights = view.weights() if transfer_requested(mixer_cls, i) else None
    try:
        record = mixer.init_from_attention(weights, i) or {}
    except (RuntimeError, NotImplementedError) as err:
        if not view.meta:
            raise
        # an init that reads values (e.g. .item()) cannot run on meta; a plan still needs the node
        return mixer, {"(meta)": f"transfer not evaluated on the meta device ({type(err).__name__})"}
    return mixer, name_sources(record, view)


def _mixer_rule(mixer_cls: type[Mixer]) -> Callable[[AttentionView, Any, Any], tuple[nn.Module, dict[str, str]]]:
    def build(view: AttentionView, params: Any, init: Any) -> tuple[nn.Module, dict[str, str]]:
        return build_mixer(mixer_cls, view, params, init)

    build.__name__ = f"build_{mixer_cls.name}"
    build.mixer_cls = mixer_cls  # type: ignore[attr-defined]
    return build


def register_mixer_rules() -> None:
    """Register a rule for every mixer in ``MIXERS`` that has none yet (idempotent)."""
    for name, cls in MIXERS.items():
        if name in RULES:
            continue
        doc = (cls.__doc__ or "").strip().splitlines()
        register_rule(
            name,
            params=cls.params_model,
            init=cls.init_model,
            description=f"attention -> {name}" + (f": {doc[0]}" if doc else ""),
        )(_mixer_rule(cls))


def mixer_of(rule_name: str) -> type[Mixer] | None:
    """The mixer class a rule builds, or None (``keep``)."""
    build = RULES[rule_name].build if rule_name in RULES else None
    return getattr(build, "mixer_cls", None)


@register_rule(
    "keep",
    params=KeepParams,
    init=KeepInit,
    description="keep the teacher attention (hybrids); a rule of its own so it can claim nodes first",
    replaces=False,
)
def keep(view: AttentionView, params: Any, init: Any) -> tuple[nn.Module, dict[str, str]]:
    """The attention stays: a deep copy of the teacher module, nothing transferred."""
    return copy.deepcopy(view.module), {}


register_mixer_rules()
