"""CUDA-graph decoding for students: one decode step over static buffers, captured once and replayed per token.

A mixer carries a fixed-size state (SSM state and conv window per layer), so a student's decode
step can run over buffers allocated once, captured in a CUDA graph and replayed without the
per-step Python and kernel-launch overhead of the Hugging Face forward (on an H100: 4.1 ms/token
against 42-55 ms eager, flat from 1k to 16k context; docs/benchmarks.md).

Nothing the forward derives from host-side state may change between replays, so the step hands
the model everything explicitly, from device tensors it advances in place:

* ``position_ids (b, 1)``: rotary and learned absolute positions (GPT-2, OPT) alike;
* for hybrids (students that keep attention layers): the kept layers' KV in fixed-size buffers
  written at a device-side column, and a fixed-shape 4-D mask hiding the unwritten tail
  (:mod:`surgery.static_kv`); the KV capacity (``max_len``) is fixed when the decoder is built;
* the cache's host-side token counts are pinned to the prefill length before every step.

``compile=True`` wraps the step in ``torch.compile(fullgraph=False)`` before
warm-up and capture (inductor fuses the per-layer elementwise work; the capture is still ours).
``compile="tuned"`` adds inductor's coordinate-descent tuning, which also rewrites a matmul with one
row (batch 1) as a multiply-and-reduce that inductor can fuse with its neighbours (the norm before
it, the gate after it) instead of a separate GEMV launch; the gpt-fast recipe for launch-bound decode
(PyTorch team, "Accelerating generative AI with PyTorch II: GPT, Fast", 2023). Compiling takes longer.
A compile that fails falls back to the plain step with a logged warning and ``compile_error``
set; it never fails silently. :func:`graph_unsupported_reason` says why a model cannot take
this path (a teacher, an unknown position convention, sliding-window or flash attention kept).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

__all__ = ["COMPILE_MODES", "GraphedDecoder", "StaticDecoder", "compile_options", "fuse_decode_projections",
           "graph_unsupported_reason"]

logger = logging.getLogger("surgery")
_POSITIONS = ("rope", "learned")  # the position conventions the static step feeds (explicit position_ids)
_MASKED_ATTENTION = ("eager", "sdpa")  # implementations that take the static step's additive 4-D mask


COMPILE_MODES: dict[bool | str, dict[str, Any] | None] = {
    False: None,  # no torch.compile
    True: {},  # inductor's defaults
    "tuned": {"coordinate_descent_tuning": True},  # one-row matmuls become fusable reductions
}


def compile_options(compile: bool | str) -> dict[str, Any] | None:
    """Inductor options for a ``compile`` setting (None: do not compile); an unknown setting raises ``ValueError``."""
    if not isinstance(compile, (bool, str)) or compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r}: expected one of {sorted(map(repr, COMPILE_MODES))}")
    return COMPILE_MODES[compile]


def kept_attention_layers(model: nn.Module) -> list[int]:
    """Decoder layer indices of ``model`` that are not SSM mixers (kept attention)."""
    from rewrites.adapters import get_adapter

    from .cache import mixer_layer_indices

    mixers = set(mixer_layer_indices(model))
    return [i for i in range(len(get_adapter(model).decoder_layers())) if i not in mixers]


def graph_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model``'s decode step cannot run as a static (graph-capturable) step, or None when it can."""
    from rewrites.adapters import get_adapter
    from transformers import DynamicCache

    from .cache import mixer_layer_indices

    if not mixer_layer_indices(model):
        return "the model has no SSM mixers (a teacher?); decode it with generate and a static KV cache"
    adapter = get_adapter(model)
    if adapter.positions not in _POSITIONS:
        return (f"{model.config.model_type} has position convention {adapter.positions!r}, which the static step "
                f"does not know (it feeds {_POSITIONS})")
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no position_ids, which the static step must feed"
    kept = kept_attention_layers(model)
    if not kept:
        return None
    implementation = model.config._attn_implementation
    if implementation not in _MASKED_ATTENTION:
        return (f"the kept attention layers use attn_implementation {implementation!r}; the static step's 4-D mask "
                f"needs one of {_MASKED_ATTENTION} (model.set_attn_implementation('sdpa'))")
    config = model.config.get_text_config(decoder=True)
    layers = DynamicCache(config=config).layers  # what generate would build
    types = getattr(config, "layer_types", None) or getattr(config, "attention_layers", None) or []  # GPT-Neo's name
    full = ("full_attention", "global")
    sliding = [i for i in kept if (i < len(layers) and getattr(layers[i], "is_sliding", False))
               or (i < len(types) and types[i] not in full)]
    if sliding:
        return (f"kept attention layers {sliding} are not full attention (sliding or local windows), which the "
                "static KV cache does not implement")
    return None


def _max_positions(model: nn.Module) -> int | None:
    """How many learned absolute positions ``model`` has (None: rotary, no table to run off)."""
    from rewrites.adapters import get_adapter

    if get_adapter(model).positions != "learned":
        return None
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)


def fuse_decode_projections(model: nn.Module, cache: Any) -> int:
    """Give each mixer's slot in ``cache`` its decode projections stacked into one matmul; returns how many slots.

    Only the cache gets the stacked copy (:class:`~surgery.mixers._common.FusedProjection`), so it
    lives and dies with the decoder that owns the cache; the model's own weights are untouched.
    """
    from .cache import surgery_cache
    from .mixers._common import FusedProjection
    from .mixers.base import Mixer

    full, n = surgery_cache(cache), 0
    for module in model.modules():
        if isinstance(module, Mixer) and module.decode_projections():
            full.ssm_layer(module.layer_idx).fused_projection = FusedProjection.of(module.decode_projections())
            n += 1
    return n


class StaticDecoder:
    """One decode step of a student over buffers allocated once (what a CUDA graph needs).

    The next tokens ``ids (b, 1)``, their ``positions (b, 1)``, every mixer's SSM and conv state
    and (hybrids) the kept layers' KV and mask live in static tensors; :meth:`step` points the
    cache's slots at them, runs the model's own forward, copies the new state back in place and
    advances positions and KV column. With ``greedy`` the argmax of the step's logits is written
    into ``ids`` inside the step, so replays chain without the host.

    ``fuse`` (default): each mixer's input projections run as one matmul per step
    (:func:`fuse_decode_projections`), from a stacked copy of their weights in the cache.
    ``max_len``: the most tokens (prompt included) the kept attention layers hold; required for
    hybrids. ``attention_mask (b, L)``: the prefill's padding mask (left padding), or None for
    unpadded rows. A step past ``max_len`` or past a learned position table raises ``ValueError``
    before it runs (a host-side count, no sync).
    """

    def __init__(self, model: nn.Module, cache: Any, first_ids: torch.Tensor, *, greedy: bool = True,
                 max_len: int | None = None, attention_mask: torch.Tensor | None = None,
                 compile: bool | str = False, fuse: bool = True) -> None:
        from .cache import SSMCacheLayer
        from .hf_conventions import cache_keyword
        from .static_kv import KVMask, freeze_kv_layers

        options = compile_options(compile)  # an unknown setting raises before anything is built
        self.model, self.cache, self.greedy = model, cache, greedy
        self.slots = [s for s in cache.layers if isinstance(s, SSMCacheLayer)]
        if not self.slots:
            raise NotImplementedError("the cache holds no SSM mixer state (is this a student's SurgeryCache?)")
        self.seen = max(s.get_seq_length() for s in cache.layers)  # prefill length L (host int, read once)
        kept = len(self.slots) < len(cache.layers)
        if kept and max_len is None:
            raise ValueError("this student keeps attention layers: give max_len (prompt + new tokens) to size their KV")
        limits = [n for n in (max_len if kept else None, _max_positions(model)) if n is not None]
        self.limit = min(limits) if limits else None
        self.fed = self.seen  # host count: the column of the token in `ids`
        device = first_ids.device
        self.ids = first_ids.clone()  # (b, 1)
        b = first_ids.shape[0]
        start = torch.full((b, 1), self.seen, dtype=torch.long, device=device)
        self.positions = start if attention_mask is None else attention_mask.to(device).long().sum(-1, keepdim=True)
        self.states = [(s.recurrent_states[0].clone(), None if s.conv_states[0] is None else s.conv_states[0].clone())
                       for s in self.slots]  # per layer: ssm (b, h, p, n), conv (b, channels, k-1)
        self.kw: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.kw.update({cache_keyword(model.forward): cache, "position_ids": self.positions})
        self.column: torch.Tensor | None = None  # (1,) long: the KV history column of the current token
        self.mask: KVMask | None = None
        if kept:
            self.column = torch.full((1,), self.seen, dtype=torch.long, device=device)
            freeze_kv_layers(cache, max_len, self.column)
            dtype = model.get_input_embeddings().weight.dtype
            self.mask = KVMask(b, max_len, self.seen, dtype, device, attention_mask)
            self.kw["attention_mask"] = self.mask.mask  # (b, 1, 1, max_len + 1)
        self.fused = fuse_decode_projections(model, cache) if fuse else 0
        self.compile_error: str | None = None
        self._fn = self._run
        self._compiled = self._compile_ok = False
        if options is not None:
            # dynamic=None: a second prefill length compiles once more with the length symbolic; later
            # lengths, and later decoders of the same model, batch and mode, reuse the compiled step
            self._fn = torch.compile(self._run, fullgraph=False, dynamic=None, options=options or None)
            self._compiled = True

    @property
    def compiled(self) -> bool:
        """Whether the step runs through ``torch.compile`` (False after a fallback; see ``compile_error``)."""
        return self._compiled

    def reserve(self) -> None:
        """Count one more fed token on the host; raise ``ValueError`` when the buffers or positions run out."""
        if self.limit is not None and self.fed >= self.limit:
            raise ValueError(f"the static decoder is full: it holds {self.limit} tokens (prompt included); "
                             "build it with a larger max_len")
        self.fed += 1

    def step(self, *, eager: bool = False) -> torch.Tensor:
        """Advance one token in place; returns the logits ``(b, 1, V)``. ``eager``: skip ``torch.compile`` (checks)."""
        self.reserve()
        if eager:
            return self._run()
        if self._compiled and self.compile_error is None and not self._compile_ok:
            return self._first_compiled_step()
        return self._fn()

    def _first_compiled_step(self) -> torch.Tensor:
        """The first compiled call (it compiles); on failure, restore the state and fall back to the plain step."""
        snap = self.snapshot()
        try:
            logits = self._fn()
            self._compile_ok = True
            return logits
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, loudly
            self.compile_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            logger.warning("torch.compile of the decode step failed (%s); decoding with the uncompiled step",
                           self.compile_error)
            self.restore(snap)  # the snapshot was taken after this step's reservation
            self._fn, self._compiled = self._run, False
            return self._fn()

    def _run(self) -> torch.Tensor:
        """The device work of one step (what is compiled and captured); no host reads."""
        for slot, (ssm, conv) in zip(self.slots, self.states):  # the cache reads the static buffers ...
            slot.recurrent_states[0] = ssm
            slot.conv_states[0] = conv
            slot.seen_tokens = self.seen  # pinned: the forward sees the same host state every step
        logits = self.model(self.ids, use_cache=True, **self.kw).logits
        for slot, (ssm, conv) in zip(self.slots, self.states):  # ... and the new state goes back into them
            ssm.copy_(slot.recurrent_states[0])
            if conv is not None:
                conv.copy_(slot.conv_states[0])
        if self.mask is not None:
            self.mask.admit(self.column)  # the token just written joins the history
            self.column.add_(1)
        self.positions.add_(1)
        if self.greedy:
            self.ids.copy_(logits[:, -1:].argmax(-1))
        return logits

    def snapshot(self) -> dict[str, Any]:
        """Everything a step changes except KV columns past the current one (rewritten before they are unmasked)."""
        return {"states": [(a.clone(), None if c is None else c.clone()) for a, c in self.states],
                "ids": self.ids.clone(), "positions": self.positions.clone(), "fed": self.fed,
                "column": None if self.column is None else self.column.clone(),
                "mask": None if self.mask is None else self.mask.mask.clone()}

    def restore(self, snap: dict[str, Any]) -> None:
        for (a, c), (sa, sc) in zip(self.states, snap["states"]):
            a.copy_(sa)
            if c is not None:
                c.copy_(sc)
        self.ids.copy_(snap["ids"])
        self.positions.copy_(snap["positions"])
        self.fed = snap["fed"]
        if self.mask is not None:
            self.column.copy_(snap["column"])
            self.mask.mask.copy_(snap["mask"])


class GraphedDecoder:
    """Decode a student one token per call, through a captured CUDA graph on CUDA.

    ``decoder(ids)`` feeds ``ids (b, 1)`` and returns the next logits ``(b, V)``. Without ``capture``
    (the default off CUDA) the same static step runs eagerly, which is what the CPU tests check.
    ``max_len`` (hybrids: required), ``attention_mask``, ``compile`` and ``fuse``: see :class:`StaticDecoder`.
    The cache is owned by the decoder afterwards (its host-side lengths stay at the prefill's).
    """

    def __init__(self, model: nn.Module, cache: Any, first_ids: torch.Tensor, *, greedy: bool = False,
                 capture: bool | None = None, warmup: int = 3, max_len: int | None = None,
                 attention_mask: torch.Tensor | None = None, compile: bool | str = False, fuse: bool = True) -> None:
        reason = graph_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"cannot graph-capture this student's decode step: {reason}")
        self.capture = first_ids.is_cuda if capture is None else capture
        spare = max(warmup, 1) + 1 if self.capture and max_len is not None else 0  # warm-up and capture steps, rolled back
        self.step = StaticDecoder(model, cache, first_ids, greedy=greedy, attention_mask=attention_mask,
                                  max_len=None if max_len is None else max_len + spare, compile=compile,
                                  fuse=fuse)
        self.graph: torch.cuda.CUDAGraph | None = None
        if self.capture:
            with torch.no_grad():
                self._capture(model, warmup)

    def _capture(self, model: nn.Module, warmup: int) -> None:
        before = model.config._attn_implementation
        # transformers < 5.23 builds the eager mask with torch.tensor(0.0, device=cuda): a host-to-device copy
        # that capture refuses. Without kept attention there is nothing to mask and SDPA's path has none; a
        # hybrid's step passes its own 4-D mask, so no mask is built.
        switch = before == "eager" and self.step.mask is None
        if switch:
            model.set_attn_implementation("sdpa")
        try:
            snap = self.step.snapshot()
            device = self.step.ids.device
            side = torch.cuda.Stream(device)  # warm up on a side stream before capturing (CUDA graph rules)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(max(warmup, 1 if self.step.compiled else 0)):  # compiling happens here, not in capture
                    self.step.step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records kernels; the state buffers are restored below
                self.logits = self.step.step()
            self.step.restore(snap)
        finally:
            if switch:
                model.set_attn_implementation(before)

    @property
    def compile_error(self) -> str | None:
        """Why ``compile=True`` fell back to the uncompiled step (None: it did not)."""
        return self.step.compile_error

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``ids (b, 1)`` (None: the greedy token the last step chose) and return logits ``(b, V)``."""
        if ids is not None:
            self.step.ids.copy_(ids)
        if self.graph is not None:
            self.step.reserve()
            self.graph.replay()
            return self.logits[:, -1].clone()
        return self.step.step()[:, -1]

    @property
    def next_ids(self) -> torch.Tensor:
        """The token ids the next call will feed, ``(b, 1)`` (the greedy choice with ``greedy=True``)."""
        return self.step.ids
