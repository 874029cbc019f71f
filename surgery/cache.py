"""Recurrent decoding for students: one cache for kept attention KV and SSM mixer state.

:class:`SurgeryCache` is a ``transformers`` :class:`~transformers.DynamicCache` whose mixer
layers are :class:`SSMCacheLayer` objects (SSM state ``(b, h, p, n)`` and the short conv's last
``k - 1`` inputs ``(b, channels, k - 1)``) while kept attention layers stay ordinary
``DynamicLayer`` / ``DynamicSlidingWindowLayer`` KV caches.

``SSMCacheLayer`` builds on transformers' ``LinearAttentionCacheLayerMixin`` (the layer type
its own Mamba/linear-attention hybrids use): the library's generic code then knows these
layers hold no KV (``Cache.is_linear``, mask sizing picks a kept attention layer,
``has_previous_state``, ``get_conv_state``/``get_recurrent_state``, beam-search
``reorder_cache``, offloading, ``is_croppable`` is False once a state exists). On top of the
mixin it counts the tokens it has seen, so that ``get_seq_length`` and the mask sizes are right
even when layer 0 -- or every layer -- is a mixer (``generate`` derives positions from them), and
it implements ``batch_repeat_interleave`` / ``batch_select_indices``.

A student's mixers also accept the plain ``DynamicCache`` that a model's ``forward`` or
``generate`` creates by default: :func:`surgery_cache` upgrades it in place (same object, class
``SurgeryCache``; safe because the subclass adds no state of its own and is only needed from
the second forward on). Every other cache type (static, quantized, a DynamicCache subclass, a
cache whose mixer slot already holds KV) raises a ``TypeError`` that says what to do.
:func:`enable_recurrent_cache` makes the model create a ``SurgeryCache`` itself, handing it to
``forward`` and ``generate`` the documented way: as the cache keyword argument (``cache`` from
transformers 5.24, ``past_key_values`` before; :mod:`surgery.hf_conventions`).

Never silently wrong: a mixer whose slot is empty although the cache has seen earlier tokens
(the state was dropped or the cache rebuilt between steps) raises :class:`MissingStateError`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionCacheLayerMixin

from .hf_conventions import MODEL_CACHE_KEYWORDS, cache_keyword

logger = logging.getLogger("surgery")

__all__ = [
    "MissingStateError", "SSMCacheLayer", "SurgeryCache", "check_continuation_has_state", "enable_recurrent_cache",
    "fresh_sequences", "mixer_layer_indices", "surgery_cache",
]


class MissingStateError(RuntimeError):
    """A mixer found its recurrent state missing from a cache that has seen earlier tokens."""


class SSMCacheLayer(LinearAttentionCacheLayerMixin):
    """One mixer layer's recurrent state: ``ssm_state (b, h, p, n)``, ``conv_state (b, channels, k-1)``.

    Either may be None for a mixer without that part (no conv: ``conv_state`` stays None).
    ``seen_tokens`` counts every token passed through (padding included, like a KV cache's length).
    """

    is_sliding = False
    is_compileable = False  # keep generate from auto-compiling / building static 4-D masks

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(number_of_states=1)
        self.seen_tokens = 0
        self.keys = self.values = None  # no KV (DynamicCache.__iter__ and DDP gathers read these)
        self.fused_projection: Any = None  # the mixer's decode projections as one matmul (set by the static decoder)

    # -- the mixin's abstract API (state 0 only) --------------------------------------------
    def lazy_initialization(
        self, conv_states: torch.Tensor | None = None, recurrent_states: torch.Tensor | None = None, state_idx: int = 0
    ) -> None:
        ref = conv_states if conv_states is not None else recurrent_states
        if ref is not None and self.device is None:
            self.device, self.dtype = ref.device, ref.dtype
        if conv_states is not None:
            self.is_conv_states_initialized[state_idx] = True
            self.conv_kernel_size[state_idx] = conv_states.shape[-1]
        if recurrent_states is not None:
            self.is_recurrent_states_initialized[state_idx] = True

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        """Replace the conv state (the mixer computes the new window itself)."""
        self.lazy_initialization(conv_states=conv_states, state_idx=state_idx)
        self.conv_states[state_idx] = conv_states
        self.has_previous_state[state_idx] = True
        return conv_states

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        """Replace the SSM state."""
        self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
        self.recurrent_states[state_idx] = recurrent_states
        self.has_previous_state[state_idx] = True
        return recurrent_states

    # -- what mixers use -----------------------------------------------------------------
    @property
    def has_state(self) -> bool:
        """Whether a previous forward left a state (False on a fresh or reset layer)."""
        return self.seen_tokens > 0

    @property
    def ssm_state(self) -> torch.Tensor | None:
        """``(b, h, p, n)`` or None."""
        return self.recurrent_states[0] if self.has_state else None

    @property
    def conv_state(self) -> torch.Tensor | None:
        """``(b, channels, k - 1)`` or None."""
        return self.conv_states[0] if self.has_state else None

    def store(self, ssm_state: torch.Tensor, conv_state: torch.Tensor | None, n_tokens: int) -> None:
        """Record the state after ``n_tokens`` more tokens."""
        self.update_recurrent_state(ssm_state)
        if conv_state is not None:
            self.update_conv_state(conv_state)
        self.seen_tokens += n_tokens

    # -- sequence length and masks ------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Like a full-attention layer: ``(seen + query_length, 0)``."""
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    # -- batch manipulation (generate: contrastive search, num_return_sequences) --------------
    def _map_states(self, fn: Any) -> None:
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i] and self.conv_states[i] is not None:
                self.conv_states[i] = fn(self.conv_states[i])
            if self.is_recurrent_states_initialized[i] and self.recurrent_states[i] is not None:
                self.recurrent_states[i] = fn(self.recurrent_states[i])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_states(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))


class SurgeryCache(DynamicCache):
    """KV for kept attention layers plus :class:`SSMCacheLayer` state for mixer layers.

    ``config``: the model config (as for ``DynamicCache``: sliding-window layers get sliding KV
    caches). ``mixer_layers``: decoder layer indices of mixers; others are found lazily when a
    mixer first asks for its slot (:meth:`ssm_layer`).
    """

    def __init__(self, config: Any = None, mixer_layers: Iterable[int] = (), **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        for idx in mixer_layers:
            self.ssm_layer(idx)

    def ssm_layer(self, layer_idx: int) -> SSMCacheLayer:
        """The state slot of the mixer at ``layer_idx`` (created on first use)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(DynamicLayer())
        layer = self.layers[layer_idx]
        if isinstance(layer, SSMCacheLayer):
            return layer
        if not isinstance(layer, DynamicLayer) or (layer.is_initialized and layer.get_seq_length() > 0):
            raise TypeError(
                f"cache layer {layer_idx} is a {type(layer).__name__} holding attention state, but layer {layer_idx} is "
                "an SSM mixer; use a fresh cache (SurgeryCache()) for this student"
            )
        layer = SSMCacheLayer()
        self.layers[layer_idx] = layer
        return layer

    def check_state_present(self, layer_idx: int, n_tokens: int) -> None:
        """Raise :class:`MissingStateError` if mixer ``layer_idx`` has no state but the cache has seen earlier tokens.

        ``n_tokens``: the length of the forward now running. Layers before ``layer_idx`` have
        already taken those tokens in this forward; layers after it have not.
        """
        if self._is_ssm(layer_idx) and self.layers[layer_idx].has_state:
            return
        past = 0
        for i, layer in enumerate(self.layers):
            if i != layer_idx:
                past = max(past, layer.get_seq_length() - (n_tokens if i < layer_idx else 0))
        if past > 0:
            raise MissingStateError(
                f"the SSM state of layer {layer_idx} is missing from a cache that has already seen {past} tokens: the "
                "cache was rebuilt or its mixer layers dropped between decoding steps, and carrying on would generate "
                "from a blank state. Pass the same SurgeryCache to every step (model(..., use_cache=True) returns it), "
                "or use a transformers version from the supported range (README, 'Dependencies')"
            )

    def _is_ssm(self, layer_idx: int) -> bool:
        return layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], SSMCacheLayer)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by ``layer_idx`` (correct for mixer layers too; an empty slot 0 defers to the others)."""
        if self._is_ssm(layer_idx):
            return self.layers[layer_idx].get_seq_length()
        if layer_idx == 0 and self.layers and isinstance(self.layers[0], DynamicLayer) and not self.layers[0].is_initialized:
            return max((self.get_seq_length(i) for i in range(1, len(self.layers))), default=0)
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self._is_ssm(layer_idx):
            return self.layers[layer_idx].get_mask_sizes(query_length)
        return super().get_mask_sizes(query_length, layer_idx)


def surgery_cache(cache: Any) -> SurgeryCache:
    """The :class:`SurgeryCache` behind ``cache`` (what a mixer receives as ``past_key_values``).

    A plain ``DynamicCache`` is upgraded in place (see the module docstring); an
    ``EncoderDecoderCache`` is unwrapped to its self-attention cache; anything else raises.
    """
    if isinstance(cache, SurgeryCache):
        return cache
    inner = getattr(cache, "self_attention_cache", None)
    if inner is not None:
        return surgery_cache(inner)
    if type(cache) is DynamicCache and not cache.offloading:
        cache.__class__ = SurgeryCache
        return cache
    raise TypeError(
        f"an SSM mixer got a {type(cache).__name__}; it needs a surgery.cache.SurgeryCache to carry its recurrent "
        "state. Call surgery.cache.enable_recurrent_cache(model) (then model(...) and model.generate(...) create one), "
        "or pass past_key_values=SurgeryCache(); static, quantized and offloaded caches are not supported"
    )


_FRESH_SEQUENCES = 0  # > 0 inside fresh_sequences()


@contextmanager
def fresh_sequences() -> Iterator[None]:
    """Inside the block, every call starts its sequences at position 0 without a cache (training batches).

    Mixers then skip :func:`check_continuation_has_state`: its read of ``position_ids`` waits for
    the device once per layer and call, which in training stalls the queue of kernels 30 times a
    forward. The stage runner trains inside this block.
    """
    global _FRESH_SEQUENCES
    _FRESH_SEQUENCES += 1
    try:
        yield
    finally:
        _FRESH_SEQUENCES -= 1


def check_continuation_has_state(cache: Any, layer_idx: int, position_ids: Any) -> None:
    """Raise :class:`MissingStateError` when a call continues a sequence but mixer ``layer_idx`` has no state.

    A continuation is a call whose ``position_ids (b, L)`` all start after 0 (prefills always hold
    position 0, left-padded rows included); without state in ``cache`` (or without a cache) the
    mixer would decode those tokens as if nothing came before them.
    """
    if _FRESH_SEQUENCES or not isinstance(position_ids, torch.Tensor) or position_ids.numel() == 0:
        return
    if cache is not None:
        full = cache if isinstance(cache, SSMCacheLayer) else surgery_cache(cache)
        slot = full if isinstance(full, SSMCacheLayer) else (full.layers[layer_idx] if full._is_ssm(layer_idx) else None)
        if slot is not None and slot.has_state:
            return
    first = int(position_ids.min())
    if first > 0:
        raise MissingStateError(
            f"layer {layer_idx} (an SSM mixer) was asked to continue a sequence at position {first} with "
            f"{'no cache' if cache is None else 'a cache holding no state for it'}: the recurrent state of the earlier "
            "tokens is missing, and carrying on would generate from a blank state. Pass the cache that the earlier "
            "call returned (model(..., use_cache=True)), or start at position 0"
        )


def mixer_layer_indices(model: nn.Module) -> list[int]:
    """Decoder layer indices of the SSM mixers in ``model``."""
    from .mixers.base import Mixer

    return sorted({m.layer_idx for m in model.modules() if isinstance(m, Mixer)})


_SUBCLASSES: dict[type, type] = {}
_ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")  # generate's speculative modes


def _fast_generate(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, required: str | None,
                   compile: bool | str = False) -> Any:
    """``generate``'s output through the captured decode step, or None (the reason logged).

    ``required``: the keyword that asked for the step (``"cuda_graph=True"``, ``"compile_step=..."``); where the
    step does not apply, that is a ``ValueError`` naming it instead of a fallback.
    """
    from .graph_generate import fast_path_reason, graph_generate

    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "inputs")}
    reason = "positional arguments after the prompt" if len(args) > 1 else fast_path_reason(model, ids, rest)
    if reason is None:
        return graph_generate(model, ids, rest, compile=compile)
    if required:
        raise ValueError(f"generate({required}): the captured decode step does not apply: {reason}")
    if isinstance(ids, torch.Tensor) and ids.is_cuda:
        logger.info("generate: decoding without the captured CUDA-graph step: %s", reason)
    return None


def _recurrent_subclass(cls: type) -> type:
    """A subclass of the model class ``cls`` that creates a :class:`SurgeryCache` by default (cached per class)."""
    if getattr(cls, "_surgery_recurrent", False):
        return cls
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]
    signature = inspect.signature(cls.forward)
    generate_signature = inspect.signature(cls.generate)
    key = cache_keyword(cls.forward)  # "cache" (transformers >= 5.24) or "past_key_values"

    def has_cache(bound: dict[str, Any], kwargs: dict[str, Any]) -> bool:
        return any(bound.get(k) is not None or kwargs.get(k) is not None for k in MODEL_CACHE_KEYWORDS)

    @functools.wraps(cls.forward)  # keeps the signature: generate inspects it (position_ids, logits_to_keep)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(self, *args, **kwargs).arguments
        use_cache = bound.get("use_cache", kwargs.get("use_cache"))
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if use_cache and not has_cache(bound, kwargs):
            kwargs[key] = self.new_surgery_cache()
        return cls.forward(self, *args, **kwargs)

    @functools.wraps(cls.generate)
    def generate(self: Any, *args: Any, cuda_graph: bool | None = None, compile_step: bool | str = False,
                 **kwargs: Any) -> Any:
        """``generate`` with a fresh :class:`SurgeryCache` passed in, as a caller-provided cache (public API).

        On CUDA it decodes through the captured step when it applies (:mod:`surgery.graph_generate`;
        why not is logged); ``cuda_graph=False`` opts out, ``cuda_graph=True`` raises where it does not apply.
        ``compile_step`` (True or "tuned"): torch.compile the captured step first
        (:func:`surgery.graph_decode.compile_options`; compiled once per model, batch and mode in a process);
        like ``cuda_graph=True``, it raises where the step does not apply.
        """
        from .graph_decode import compile_options

        compile_options(compile_step)  # an unknown setting raises here, before any work
        if compile_step and cuda_graph is False:
            raise ValueError(f"generate(compile_step={compile_step!r}) compiles the captured decode step, which "
                             "cuda_graph=False turns off; give one")
        if cuda_graph is not False:
            required = "cuda_graph=True" if cuda_graph else f"compile_step={compile_step!r}" if compile_step else None
            fast = _fast_generate(self, args, kwargs, required=required, compile=compile_step)
            if fast is not None:
                return fast
        bound = generate_signature.bind_partial(self, *args, **kwargs).arguments
        config = bound.get("generation_config") or self.generation_config
        assisted = [k for k in _ASSISTED if kwargs.get(k, getattr(config, k, None)) is not None]
        if assisted:  # transformers >= 5.25 would try, and crop a state that keeps no history
            raise ValueError(
                f"generate({assisted[0]}=...): assisted / speculative decoding rolls back rejected tokens, which a "
                "student's stateful recurrent cache cannot do; generate without it"
            )
        implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        if implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by SSM students; "
                "leave it unset (a SurgeryCache is used)"
            )
        use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
        # "dynamic": generate builds its DynamicCache, which the mixers upgrade in place (surgery_cache)
        if use_cache is not False and implementation is None and not has_cache(bound, kwargs):
            kwargs[key] = self.new_surgery_cache()
        return cls.generate(self, *args, **kwargs)

    def new_surgery_cache(self: Any) -> SurgeryCache:
        """A fresh :class:`SurgeryCache` for this model (mixer slots pre-created)."""
        config = self.config.get_text_config(decoder=True)
        return SurgeryCache(config=config, mixer_layers=mixer_layer_indices(self))

    name = f"_Recurrent_{cls.__name__}_{len(_SUBCLASSES)}"
    sub = type(
        cls.__name__,  # the class name is what save_pretrained writes to config.architectures
        (cls,),
        {
            "__module__": __name__,
            "__qualname__": name,  # importable as surgery.cache.<name>: pickling works
            "__doc__": cls.__doc__,
            "_surgery_recurrent": True,
            "_is_stateful": True,  # generate refuses assisted decoding (states cannot be rolled back)
            "forward": forward,
            "generate": generate,
            "new_surgery_cache": new_surgery_cache,
        },
    )
    globals()[name] = sub
    _SUBCLASSES[cls] = sub
    return sub


def enable_recurrent_cache(model: nn.Module) -> nn.Module:
    """Make ``model(..., use_cache=True)`` and ``model.generate(...)`` use a :class:`SurgeryCache` by default.

    The model's class is swapped (in place; the same object is returned) for a cached dynamic
    subclass that overrides ``forward`` and ``generate``: where the caller gave no cache, a fresh
    ``SurgeryCache`` is passed in as the cache keyword argument, the public way of giving
    transformers a cache (``generate`` then treats it as the caller's). A subclass rather than patched instance methods because it survives
    ``copy.deepcopy`` and pickling, keeps ``forward``'s signature (``generate`` inspects it) and
    keeps the class name that ``save_pretrained`` records. It also marks the model stateful, so
    ``generate`` refuses assisted decoding, which would need to roll SSM states back.
    Idempotent; a model without mixers is returned unchanged.
    """
    if not mixer_layer_indices(model):
        return model
    model.__class__ = _recurrent_subclass(type(model))
    return model
