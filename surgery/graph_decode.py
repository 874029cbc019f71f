"""CUDA-graph decoding for fully converted students.

A student whose every attention node is a mixer carries a fixed-size state (SSM state and conv
window per layer), so one decode step can be captured once in a CUDA graph and replayed per
token, without the per-step Python and kernel-launch overhead of the Hugging Face forward
(on an H100: 4.1 ms/token against 42-55 ms eager, flat from 1k to 16k context; docs/benchmarks.md).

What a capture bakes in: the batch size, and the position ids the forward derives from the cache
length at capture time. Mixers ignore positions, so rotary-position families are exact; families
with learned absolute positions (GPT-2, OPT) add a position embedding to every token and are
refused, as are hybrids (a kept attention layer's KV cache grows every step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["GraphedDecoder", "StaticDecoder", "graph_unsupported_reason"]


def graph_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model``'s decode step cannot be graph-captured, or None when it can."""
    from rewrites.adapters import get_adapter

    from .cache import mixer_layer_indices

    adapter = get_adapter(model)
    n_layers = len(adapter.decoder_layers())
    if len(mixer_layer_indices(model)) != n_layers:
        return "the student keeps attention layers, whose KV cache grows every step (graphs need fixed shapes)"
    if adapter.positions != "rope":
        return (f"{model.config.model_type} adds learned absolute position embeddings, which a captured step "
                "would freeze at one position")
    return None


class StaticDecoder:
    """One decode step of a fully converted student over buffers allocated once (what a CUDA graph needs).

    The next tokens ``ids (b, 1)`` and every mixer's SSM and conv state live in static tensors;
    :meth:`step` points the cache's slots at them, runs the model's own forward and copies the new
    state back in place. With ``greedy`` the argmax of the step's logits is written into ``ids``
    inside the step, so replays chain without the host.
    """

    def __init__(self, model: nn.Module, cache: Any, first_ids: torch.Tensor, *, greedy: bool = True) -> None:
        import inspect

        from .cache import SSMCacheLayer
        from .hf_conventions import cache_keyword

        self.slots = list(cache.layers)
        if not self.slots or not all(isinstance(s, SSMCacheLayer) for s in self.slots):
            raise NotImplementedError("the student keeps attention layers (their KV cache grows each step)")
        self.model, self.cache, self.greedy = model, cache, greedy
        self.kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.kw[cache_keyword(model.forward)] = cache
        self.ids = first_ids.clone()  # (b, 1)
        self.states = [(s.recurrent_states[0].clone(), None if s.conv_states[0] is None else s.conv_states[0].clone())
                       for s in self.slots]  # per layer: ssm (b, h, p, n), conv (b, channels, k-1)

    def step(self) -> torch.Tensor:
        """Advance one token in place; returns the logits ``(b, 1, V)``."""
        for slot, (ssm, conv) in zip(self.slots, self.states):  # the cache reads the static buffers ...
            slot.recurrent_states[0] = ssm
            slot.conv_states[0] = conv
        logits = self.model(self.ids, use_cache=True, **self.kw).logits
        for slot, (ssm, conv) in zip(self.slots, self.states):  # ... and the new state goes back into them
            ssm.copy_(slot.recurrent_states[0])
            if conv is not None:
                conv.copy_(slot.conv_states[0])
        if self.greedy:
            self.ids.copy_(logits[:, -1:].argmax(-1))
        return logits

    def snapshot(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor | None]], torch.Tensor]:
        return [(a.clone(), None if c is None else c.clone()) for a, c in self.states], self.ids.clone()

    def restore(self, snap: tuple[list[tuple[torch.Tensor, torch.Tensor | None]], torch.Tensor]) -> None:
        for (a, c), (sa, sc) in zip(self.states, snap[0]):
            a.copy_(sa)
            if c is not None:
                c.copy_(sc)
        self.ids.copy_(snap[1])


class GraphedDecoder:
    """Decode a fully converted student one token per call, through a captured CUDA graph on CUDA.

    ``decoder(ids)`` feeds ``ids (b, 1)`` and returns the next logits ``(b, V)``. Without ``capture``
    (the default off CUDA) the same static step runs eagerly, which is what the CPU tests check.
    The cache is owned by the decoder afterwards.
    """

    def __init__(self, model: nn.Module, cache: Any, first_ids: torch.Tensor, *, greedy: bool = False,
                 capture: bool | None = None, warmup: int = 3) -> None:
        reason = graph_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"cannot graph-capture this student's decode step: {reason}")
        self.step = StaticDecoder(model, cache, first_ids, greedy=greedy)
        self.capture = first_ids.is_cuda if capture is None else capture
        self.graph: torch.cuda.CUDAGraph | None = None
        if self.capture:
            self._capture(model, warmup)

    def _capture(self, model: nn.Module, warmup: int) -> None:
        before = model.config._attn_implementation
        # transformers < 5.23 builds the eager mask with torch.tensor(0.0, device=cuda): a host-to-device
        # copy that capture refuses. A fully converted student has no attention to mask; SDPA's path has none.
        if before == "eager":
            model.set_attn_implementation("sdpa")
        try:
            snap = self.step.snapshot()
            device = self.step.ids.device
            side = torch.cuda.Stream(device)  # warm up on a side stream before capturing (CUDA graph rules)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.step.step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records kernels; the state buffers are restored below
                self.logits = self.step.step()
            self.step.restore(snap)
        finally:
            if before == "eager":
                model.set_attn_implementation(before)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``ids (b, 1)`` (None: the greedy token the last step chose) and return logits ``(b, V)``."""
        if ids is not None:
            self.step.ids.copy_(ids)
        if self.graph is not None:
            self.graph.replay()
            return self.logits[:, -1].clone()
        return self.step.step()[:, -1]

    @property
    def next_ids(self) -> torch.Tensor:
        """The token ids the next call will feed, ``(b, 1)`` (the greedy choice with ``greedy=True``)."""
        return self.step.ids
