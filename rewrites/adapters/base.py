"""Family adapters: one place that knows how a model family lays out its attention.

An adapter answers, for one loaded model (real or on the ``meta`` device):

* where the decoder layers are and which child of a layer is the attention
  (:meth:`FamilyAdapter.decoder_layers`, :meth:`FamilyAdapter.attention_views`);
* the head geometry of an attention node (:class:`AttentionShape`) and its
  weights in the common head-major layout (:class:`AttentionWeights`), whatever
  the family fuses or transposes;
* positional information (RoPE parameters, learned positions), q/k norms;
* how the model calls a decoder layer (:meth:`FamilyAdapter.call_layer`), so
  that a layer can be traced and run on its own.

Adapters register by ``model_type`` with :func:`register_adapter`; adding a
family is one adapter class in its own module: every module of this package is
imported on first use (no list to edit), and so is every entry point of the
group ``surgery.adapters`` (:data:`ENTRY_POINT_GROUP`), so that a student built
with a third-party adapter loads in a fresh process. :func:`get_adapter` picks
the adapter by ``config.model_type`` and refuses a family it has none for (no
structural guessing: a model that merely looks like Llama may call, cache or
rebuild differently). Families that cannot be converted by design are listed in
:data:`REFUSED` with the reason, which the refusal names.
"""

from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from surgery.errors import SurgeryError, suggest
from surgery.mixers.base import AttentionShape, AttentionWeights

ADAPTERS: dict[str, type[FamilyAdapter]] = {}


class UnsupportedModelError(SurgeryError):
    """The model's family has no adapter (and does not look like a Llama-style decoder)."""


def register_adapter(*model_types: str) -> Callable[[type[FamilyAdapter]], type[FamilyAdapter]]:
    """Class decorator: register a :class:`FamilyAdapter` for ``config.model_type`` values."""

    def decorate(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
        for model_type in model_types:
            if model_type in ADAPTERS and ADAPTERS[model_type] is not cls:
                raise ValueError(f"adapter for model_type {model_type!r} is registered twice")
            ADAPTERS[model_type] = cls
        cls.model_types = tuple(model_types)
        return cls

    return decorate


@dataclass(frozen=True)
class PositionInfo:
    """How positions reach the attention node."""

    kind: str  # "rope" | "learned" | "none"
    rope_theta: float | None = None
    rotary_dim: int | None = None  # dims of each head that rotate (partial RoPE: < head_dim)
    rope_type: str | None = None  # "default", "linear", "llama3", "yarn", ...
    interleaved: bool | None = None  # True: RoPE rotates pairs (x0, x1), (x2, x3) (Cohere, GLM, GPT-J)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class AttentionView:
    """One attention node of a model, seen through its family adapter.

    ``meta=True`` makes :meth:`weights` return ``meta`` tensors and :attr:`device`
    the meta device, so rules can build mixers without touching real weights.
    """

    path: str  # e.g. "model.layers.3.self_attn"
    layer: int  # decoder layer index
    module: nn.Module = field(repr=False, compare=False)
    adapter: FamilyAdapter = field(repr=False, compare=False)
    meta: bool = False

    @property
    def type(self) -> str:
        """Class name of the attention module (``LlamaAttention``)."""
        return type(self.module).__name__

    @property
    def shape(self) -> AttentionShape:
        return self.adapter.shape(self.module)

    @property
    def device(self) -> torch.device:
        if self.meta:
            return torch.device("meta")
        return _first_tensor(self.module).device

    @property
    def dtype(self) -> torch.dtype:
        return _first_tensor(self.module).dtype

    @property
    def position(self) -> PositionInfo:
        return self.adapter.position_info(self.layer, self.shape)

    @property
    def qk_norm(self) -> bool:
        """True when the family normalises q and k per head before RoPE (Qwen3, Gemma3)."""
        return self.adapter.has_qk_norm(self.module)

    @property
    def qk_norm_scope(self) -> str | None:
        """``"head"`` (a norm per head), ``"all_heads"`` (one norm over ``n_heads * head_dim``: OLMo2) or None."""
        return self.adapter.qk_norm_scope(self.module)

    @property
    def sliding_window(self) -> int | None:
        """Window size if this layer uses sliding-window attention, else None."""
        return self.adapter.sliding_window(self.layer)

    def weights(self) -> AttentionWeights:
        """Detached copies of the q/k/v/o weights in the common head-major layout."""
        w = self.adapter.weights(self.module)
        if self.meta:
            w = _to_meta(w)
        return w

    def sources(self) -> dict[str, str]:
        """Where each :class:`AttentionWeights` field comes from, as teacher tensor names."""
        return {k: f"{self.path}.{v}" for k, v in self.adapter.weight_sources(self.module).items()}

    def params(self) -> int:
        """Parameter count of the attention module."""
        return sum(p.numel() for p in self.module.parameters())

    def on_meta(self) -> AttentionView:
        return replace(self, meta=True)

    def info(self) -> dict[str, Any]:
        """Json-able summary (for plans and diffs)."""
        s = self.shape
        return {
            "path": self.path,
            "layer": self.layer,
            "type": self.type,
            "adapter": type(self.adapter).__name__,
            "d_model": s.d_model,
            "n_heads": s.n_heads,
            "n_kv_heads": s.n_kv_heads,
            "head_dim": s.head_dim,
            "position": self.position.to_dict(),
            "qk_norm": self.qk_norm_scope or False,
            "sliding_window": self.sliding_window,
        }


def _first_tensor(module: nn.Module) -> torch.Tensor:
    for t in module.parameters():
        return t
    for t in module.buffers():
        return t
    return torch.empty(0)


def _to_meta(w: AttentionWeights) -> AttentionWeights:
    def m(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.empty_like(t, device="meta")

    return AttentionWeights(
        shape=w.shape, q=m(w.q), k=m(w.k), v=m(w.v), o=m(w.o),
        q_bias=m(w.q_bias), k_bias=m(w.k_bias), v_bias=m(w.v_bias), o_bias=m(w.o_bias),
    )  # fmt: skip


def _bias(linear: nn.Module) -> torch.Tensor | None:
    b = getattr(linear, "bias", None)
    return None if b is None else b.detach()


def weights_from_rows(
    s: AttentionShape,
    q: torch.Tensor,  # (h*p, d): rows of W_Q, head-major
    k: torch.Tensor,  # (g*p, d)
    v: torch.Tensor,  # (g*p, d)
    o: torch.Tensor,  # (d, h*p): W_O as an nn.Linear weight
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None,) * 4,
) -> AttentionWeights:
    """:class:`AttentionWeights` (detached copies) from ``nn.Linear``-style row blocks, whatever fused them."""
    h, g, p, d = s.n_heads, s.n_kv_heads, s.head_dim, s.d_model
    qb, kb, vb, ob = (None if b is None else b.detach() for b in biases)
    return AttentionWeights(
        shape=s,
        q=q.detach().reshape(h, p, d).clone(),  # (h*p, d) -> (h, p, d)
        k=k.detach().reshape(g, p, d).clone(),  # (g*p, d) -> (g, p, d)
        v=v.detach().reshape(g, p, d).clone(),
        o=o.detach().reshape(d, h, p).clone(),  # (d, h*p) -> (d, h, p)
        q_bias=None if qb is None else qb.reshape(h, p).clone(),
        k_bias=None if kb is None else kb.reshape(g, p).clone(),
        v_bias=None if vb is None else vb.reshape(g, p).clone(),
        o_bias=None if ob is None else ob.clone(),
    )


def first_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states: the tensor, or the first entry of the tuple some families return."""
    return out[0] if isinstance(out, (tuple, list)) else out


class FamilyAdapter:
    """Base adapter: separate ``q_proj``/``k_proj``/``v_proj`` ``nn.Linear`` projections.

    Subclasses set the class attributes (the layer call: :attr:`layer_kwargs`,
    :attr:`takes_position_embeddings`) and override :meth:`shape` and :meth:`weights` (fused
    layouts: :func:`weights_from_rows`), :meth:`call_layer` when the family passes other
    arguments (GPT-2, Falcon), or :meth:`refusal` for configs of the family that cannot be
    converted (Falcon with ALiBi), where their family differs.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = "model.layers"  # the nn.ModuleList of decoder layers
    attention_name: ClassVar[str] = "self_attn"  # attention child of a decoder layer
    q_name: ClassVar[str] = "q_proj"
    k_name: ClassVar[str] = "k_proj"
    v_name: ClassVar[str] = "v_proj"
    o_name: ClassVar[str] = "o_proj"
    embedding_paths: ClassVar[tuple[str, ...]] = ("model.embed_tokens",)
    final_norm_path: ClassVar[str] = "model.norm"
    positions: ClassVar[str] = "rope"  # "rope" | "learned"
    # How the family's model calls a decoder layer, besides hidden states, mask and position ids:
    # (no cache keyword: its default, None, is the same in every version, whatever the keyword is called)
    layer_kwargs: ClassVar[dict[str, Any]] = {"use_cache": False}
    takes_position_embeddings: ClassVar[bool] = True  # the layer takes the model's (cos, sin)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    def refusal(self) -> str | None:
        """Why this model cannot be converted although its family can (a config option), else None."""
        return None

    # ------------------------------------------------------------------ where things are

    @property
    def family(self) -> str:
        return str(getattr(self.config, "model_type", type(self.model).__name__))

    def decoder_layers(self) -> list[tuple[str, nn.Module]]:
        """``[(path, layer)]`` of the decoder layers, in order."""
        layers = self.model.get_submodule(self.layers_path)
        return [(f"{self.layers_path}.{i}", layer) for i, layer in enumerate(layers)]

    def attention_path(self, layer_idx: int) -> str:
        return f"{self.layers_path}.{layer_idx}.{self.attention_name}"

    def attention_views(self) -> list[AttentionView]:
        """Every attention node (one per decoder layer), in layer order."""
        return [
            AttentionView(f"{path}.{self.attention_name}", i, layer.get_submodule(self.attention_name), self)
            for i, (path, layer) in enumerate(self.decoder_layers())
        ]

    def head_path(self) -> str | None:
        """Path of the LM head (output embeddings), if any."""
        return _path_of(self.model, self.model.get_output_embeddings())

    def embedding_modules(self) -> list[str]:
        return [p for p in self.embedding_paths if _has_submodule(self.model, p)]

    # ------------------------------------------------------------------ geometry and weights

    def head_dim(self, attn: nn.Module) -> int:
        for name in ("head_dim", "head_size"):
            value = getattr(attn, name, None)
            if isinstance(value, int):
                return value
        return self.config.hidden_size // self.config.num_attention_heads

    def shape(self, attn: nn.Module) -> AttentionShape:
        q = attn.get_submodule(self.q_name)
        k = attn.get_submodule(self.k_name)
        hd = self.head_dim(attn)
        return AttentionShape(d_model=q.in_features, n_heads=q.out_features // hd, n_kv_heads=k.out_features // hd, head_dim=hd)

    def weights(self, attn: nn.Module) -> AttentionWeights:
        s = self.shape(attn)
        h, g, p, d = s.n_heads, s.n_kv_heads, s.head_dim, s.d_model
        q, k, v, o = (attn.get_submodule(n) for n in (self.q_name, self.k_name, self.v_name, self.o_name))
        qb, kb, vb = _bias(q), _bias(k), _bias(v)
        return AttentionWeights(
            shape=s,
            q=q.weight.detach().reshape(h, p, d).clone(),  # (h*p, d) -> (h, p, d)
            k=k.weight.detach().reshape(g, p, d).clone(),  # (g*p, d) -> (g, p, d)
            v=v.weight.detach().reshape(g, p, d).clone(),
            o=o.weight.detach().reshape(d, h, p).clone(),  # (d, h*p) -> (d, h, p)
            q_bias=None if qb is None else qb.reshape(h, p).clone(),
            k_bias=None if kb is None else kb.reshape(g, p).clone(),
            v_bias=None if vb is None else vb.reshape(g, p).clone(),
            o_bias=None if _bias(o) is None else _bias(o).clone(),
        )

    def weight_sources(self, attn: nn.Module) -> dict[str, str]:
        """``{AttentionWeights field: tensor name relative to the attention module}``."""
        out = {"q": f"{self.q_name}.weight", "k": f"{self.k_name}.weight", "v": f"{self.v_name}.weight", "o": f"{self.o_name}.weight"}
        for key, name in (("q", self.q_name), ("k", self.k_name), ("v", self.v_name), ("o", self.o_name)):
            if _bias(attn.get_submodule(name)) is not None:
                out[f"{key}_bias"] = f"{name}.bias"
        return out

    # ------------------------------------------------------------------ positions, norms, windows

    def rope_parameters(self, layer_idx: int) -> dict[str, Any]:
        rp = dict(getattr(self.config, "rope_parameters", None) or {})
        layer_type = self.layer_type(layer_idx)
        if layer_type is not None and isinstance(rp.get(layer_type), dict):
            rp = rp[layer_type]  # Gemma3: per layer type
        return rp

    def position_info(self, layer_idx: int, shape: AttentionShape) -> PositionInfo:
        if self.positions != "rope":
            return PositionInfo(kind=self.positions)
        rp = self.rope_parameters(layer_idx)
        factor = float(rp.get("partial_rotary_factor", getattr(self.config, "partial_rotary_factor", 1.0)) or 1.0)
        theta = rp.get("rope_theta", getattr(self.config, "rope_theta", None))
        return PositionInfo(
            kind="rope",
            rope_theta=None if theta is None else float(theta),
            rotary_dim=int(math.floor(shape.head_dim * factor)),
            rope_type=rp.get("rope_type"),
        )

    def has_qk_norm(self, attn: nn.Module) -> bool:
        return self.qk_norm_scope(attn) is not None

    def qk_norm_scope(self, attn: nn.Module) -> str | None:
        """``"head"``, ``"all_heads"`` or None: how the family normalises q (and k) before RoPE."""
        norm = next((getattr(attn, n) for n in ("q_norm", "q_layernorm") if getattr(attn, n, None) is not None), None)
        if norm is None:
            return None
        weight = getattr(norm, "weight", None)
        if weight is None and isinstance(getattr(norm, "norms", None), nn.ModuleList):  # StableLM: one per head
            return "head"
        s = self.shape(attn)
        over_all = weight is not None and weight.dim() == 1 and s.n_heads > 1 and weight.numel() == s.n_heads * s.head_dim
        return "all_heads" if over_all else "head"  # Cohere's weight is (h, p): still one norm per head, over p

    def layer_type(self, layer_idx: int) -> str | None:
        types = getattr(self.config, "layer_types", None)
        return types[layer_idx] if types else None

    def sliding_window(self, layer_idx: int) -> int | None:
        window = getattr(self.config, "sliding_window", None)
        layer_type = self.layer_type(layer_idx)
        if window is None or (layer_type is not None and layer_type != "sliding_attention"):
            return None
        if getattr(self.config, "use_sliding_window", True) is False:
            return None
        return int(window)

    # ------------------------------------------------------------------ calling a layer

    @property
    def uses_position_embeddings(self) -> bool:
        """True when the model hands ``(cos, sin)`` to each layer."""
        return self.positions == "rope"

    def call_layer(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,  # (b, L, d)
        attention_mask: torch.Tensor | None,  # (b, 1, L, L) float/bool, or None
        position_ids: torch.Tensor | None,  # (b, L)
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,  # cos, sin (b, L, rotary_dim)
    ) -> torch.Tensor:
        """Call ``layer`` the way the family's model does (without a cache): :attr:`layer_kwargs`,
        and ``position_embeddings`` where :attr:`takes_position_embeddings`."""
        kwargs = dict(self.layer_kwargs)
        if self.takes_position_embeddings:
            kwargs["position_embeddings"] = position_embeddings
        return layer(hidden_states, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


ENTRY_POINT_GROUP = "surgery.adapters"  # third-party adapters: an entry point whose module registers them

# model_type -> why the family cannot be converted (named in the refusal, and in the README's family table)
REFUSED: dict[str, str] = {}

PLUGIN_MODULES: set[str] = set()  # modules loaded from entry points (their adapters load in any process)
_discovered = False


def _load_builtin_adapters() -> None:
    """Import every module of this package, then every ``surgery.adapters`` entry point (once per process)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import importlib
    import logging
    import pkgutil
    from importlib.metadata import entry_points

    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()  # importing the module registers its adapters
            PLUGIN_MODULES.add(ep.module)
        except Exception as err:  # noqa: BLE001 - a broken plugin must not hide the built-in families
            logging.getLogger("surgery").warning("adapter plugin %s (%s) failed to load: %s: %s",
                                                 ep.name, ep.value, type(err).__name__, err)


def loads_in_fresh_process(adapter: type[FamilyAdapter]) -> bool:
    """Whether a fresh process finds ``adapter``: a built-in module, or one loaded from a ``surgery.adapters`` entry point."""
    module = adapter.__module__
    return module.startswith(f"{__package__}.") or any(module == m or module.startswith(f"{m}.") for m in PLUGIN_MODULES)


def supported_families() -> list[str]:
    _load_builtin_adapters()
    return sorted(ADAPTERS)


def refusal(model_type: str | None) -> str | None:
    """Why ``model_type`` is refused by design, or None."""
    _load_builtin_adapters()
    return REFUSED.get(str(model_type))


def unsupported_message(model_type: str | None) -> str:
    """The refusal for a family without an adapter: by design (:data:`REFUSED`), or not written yet."""
    _load_builtin_adapters()
    why = REFUSED.get(str(model_type))
    if why:
        return f"model_type {model_type!r} cannot be converted: {why}"
    return (
        f"no attention adapter for model_type {model_type!r}{suggest(str(model_type), ADAPTERS)}; "
        f"supported: {', '.join(sorted(ADAPTERS))}. Adding a family is one adapter module in rewrites/adapters/ "
        f"(or in your own package, registered under the entry point group {ENTRY_POINT_GROUP!r}); "
        "see the README, 'Adding a family'"
    )


def get_adapter(model: nn.Module) -> FamilyAdapter:
    """The adapter registered for ``model.config.model_type``; :class:`UnsupportedModelError` otherwise."""
    _load_builtin_adapters()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ADAPTERS:
        adapter = ADAPTERS[model_type](model)
        why = adapter.refusal()
        if why:
            raise UnsupportedModelError(f"this {model_type} model cannot be converted: {why}")
        return adapter
    raise UnsupportedModelError(unsupported_message(model_type))
