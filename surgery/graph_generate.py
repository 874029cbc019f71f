"""``model.generate`` for students through the captured decode step (:mod:`surgery.graph_decode`).

A loaded student's ``generate`` (:func:`surgery.cache._recurrent_subclass`) takes this path by
default on CUDA when it applies: greedy or sampled decoding (temperature, top-k, top-p), EOS and
padding handled like transformers' ``generate``, left-padded batches, a streamer. The prompt is
prefilled with the model's forward (the chunked scan), then each token is one replay of the
captured step. ``generate(..., cuda_graph=False)`` opts out; ``cuda_graph=True`` makes a call
that cannot take the path an error instead of a fallback; ``compile_step=True`` or ``"tuned"``
torch.compiles the step before capturing it (once per model, batch and mode in a process:
:mod:`surgery.graph_decode`); either way :func:`fast_path_reason` says
why not (a beam search, a logits processor, CPU, an unsupported student, ...), logged at INFO.

Greedy decoding gives generate's tokens (tests/test_graph_generate.py on CPU, uncaptured;
tests/test_gpu_decode.py on CUDA). Sampling draws from the same distribution but not the same
samples: the filters run in another order of kernels.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

__all__ = ["MIN_NEW_TOKENS", "fast_path_reason", "graph_generate"]

logger = logging.getLogger("surgery")

MIN_NEW_TOKENS = 8  # below this a capture (a few eager warm-up steps) costs more than it saves
# generation-config fields the fast path honours; any other field must keep its default value
_HONOURED = {"max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
             "pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation",
             "_from_model_config", "transformers_version", "output_attentions", "output_hidden_states"}
_CALL_ARGUMENTS = {"input_ids", "inputs", "attention_mask", "streamer", "generation_config"}


def _merged_config(model: Any, kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
    """The generation config a ``generate(**kwargs)`` call would use, and the kwargs that are not config fields."""
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    fields = config.to_dict()
    other = []
    for key, value in kwargs.items():
        if key in _CALL_ARGUMENTS:
            continue
        if key in fields or hasattr(config, key):
            setattr(config, key, value)
        else:
            other.append(key)
    return config, other


def fast_path_reason(model: Any, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> str | None:
    """Why ``model.generate(input_ids, **kwargs)`` cannot run through the captured step (None: it can)."""
    from transformers import GenerationConfig

    from .graph_decode import graph_unsupported_reason

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return "it needs the prompt as a (batch, length) tensor of token ids"
    if not input_ids.is_cuda:
        return "it needs a CUDA device"
    if not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
        return "CUDA graphs cannot be captured here"
    reason = graph_unsupported_reason(model)
    if reason is not None:
        return reason
    config, other = _merged_config(model, kwargs)
    if other:
        return f"generate({', '.join(sorted(other))}=...) is not supported on the fast path"
    defaults = GenerationConfig().to_dict()
    changed = sorted(k for k, v in config.to_dict().items() if k not in _HONOURED and k in defaults and v != defaults[k])
    if changed:
        return f"generation option(s) {', '.join(changed)} are not supported on the fast path"
    if config.cache_implementation not in (None, "dynamic"):
        return f"cache_implementation={config.cache_implementation!r}"
    if config.use_cache is False:
        return "use_cache=False"
    new = _new_tokens(config, input_ids.shape[1])
    if new < MIN_NEW_TOKENS:
        return f"{new} new tokens are too few to pay for capturing the step (the fast path starts at {MIN_NEW_TOKENS})"
    streamer = kwargs.get("streamer")
    if streamer is not None and input_ids.shape[0] != 1:
        return "a streamer takes one sequence"
    return None


def _new_tokens(config: Any, prompt_len: int) -> int:
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    return int(config.max_length) - prompt_len


def _eos_ids(config: Any) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _choose(logits: torch.Tensor, config: Any) -> torch.Tensor:
    """Next tokens from ``logits (b, V)``: argmax, or a sample after temperature, top-k and top-p. -> (b,)."""
    if not config.do_sample:
        return logits.argmax(-1)
    scores = logits.float() / (config.temperature or 1.0)
    if config.top_k and 0 < config.top_k < scores.shape[-1]:
        kth = scores.topk(config.top_k, dim=-1).values[:, -1:]  # (b, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > config.top_p  # keep the smallest set reaching top_p (at least one)
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1)[:, 0]


@torch.no_grad()
def graph_generate(model: Any, input_ids: torch.Tensor, kwargs: dict[str, Any], *, capture: bool = True,
                   compile: bool | str = False) -> torch.Tensor:
    """``generate``'s output ids ``(b, L + new)`` through :class:`~surgery.graph_decode.GraphedDecoder`.

    Call :func:`fast_path_reason` first (this does not check). ``capture=False`` runs the same
    static step uncaptured (CPU tests). ``compile``: see :class:`~surgery.graph_decode.StaticDecoder`.
    """
    from .graph_decode import GraphedDecoder
    from .hf_conventions import output_cache

    config, _ = _merged_config(model, kwargs)
    attention_mask = kwargs.get("attention_mask")
    streamer = kwargs.get("streamer")
    b, length = input_ids.shape
    new = _new_tokens(config, length)
    eos = _eos_ids(config)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    padded = attention_mask is not None and not bool(attention_mask.all())
    prefill: dict[str, Any] = {}
    if padded:
        prefill = {"attention_mask": attention_mask, "position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}
    out = model(input_ids, use_cache=True, **prefill)
    token = _choose(out.logits[:, -1], config)  # (b,)
    decoder = GraphedDecoder(model, output_cache(out), token[:, None], greedy=not config.do_sample, capture=capture,
                             max_len=length + new, attention_mask=attention_mask if padded else None,
                             compile=compile)
    del out
    if streamer is not None:
        streamer.put(input_ids.cpu())
    eos_t = torch.tensor(eos, device=input_ids.device)
    unfinished = torch.ones(b, dtype=torch.bool, device=input_ids.device)
    tokens = []
    for i in range(new):
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        tokens.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if eos:
            unfinished &= ~torch.isin(token, eos_t)
        if i == new - 1 or (eos and not bool(unfinished.any())):
            break
        logits = decoder(token[:, None])  # (b, V)
        token = decoder.next_ids[:, 0].clone() if not config.do_sample else _choose(logits, config)
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(tokens, 1)], dim=1)
