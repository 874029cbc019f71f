"""Forward hooks that record how modules were called (no forked model files).

:func:`record_attention_qk` records what the teacher's attention computed from -- ``q`` and ``k``
after every projection, norm and rotary embedding, its scale and mask -- through transformers'
public ``AttentionInterface`` (a registered attention function that records, then runs SDPA).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

RECORDING_IMPLEMENTATION = "surgery_record"
# keyword arguments of an attention call that leave it a plain causal softmax (sliding_window: when >= L)
PLAIN_KWARGS = frozenset({"dropout", "scaling", "position_ids", "use_cache", "sliding_window", "cache_position",
                          "output_attentions", "is_causal"})


@dataclass
class Call:
    """One recorded module call: its positional and keyword arguments, and its output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None

    @property
    def hidden_states(self) -> torch.Tensor:
        """The first tensor argument (decoder blocks and attention take it first)."""
        return self.kwargs["hidden_states"] if "hidden_states" in self.kwargs else self.args[0]

    def replay(self, module: nn.Module) -> Any:
        """Call ``module`` exactly as the recorded module was called."""
        return module(*self.args, **self.kwargs)


def first_tensor(output: Any) -> torch.Tensor:
    """A block or attention output: a tensor, or a tuple whose first entry is the tensor."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def record_calls(model: nn.Module, paths: list[str], outputs: bool = False) -> Iterator[dict[str, Call]]:
    """Record the call of each module at ``paths`` during the with-block (the last call wins)."""
    calls: dict[str, Call] = {}
    handles = []
    for path in paths:
        module = model.get_submodule(path)

        def pre_hook(_m: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            calls[path] = Call(args, dict(kwargs))

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        if outputs:

            def hook(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any, path: str = path) -> None:
                calls[path].output = first_tensor(output)

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def can_switch_attention(model: nn.Module) -> bool:
    """Whether transformers lets ``model`` change its attention implementation at run time (it warns and
    does nothing for families whose attention does not go through the ``AttentionInterface``)."""
    ask = getattr(type(model), "_can_set_attn_implementation", None)
    return bool(ask()) if callable(ask) else True


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention (which returns probabilities) inside the block."""
    config = model.config
    before = config._attn_implementation
    if before != "eager" and can_switch_attention(model):
        model.set_attn_implementation("eager")
    forced = config._attn_implementation != "eager"  # Falcon: no dynamic switch; its attention reads the config
    if forced:
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        if forced:
            config._attn_implementation = before
        elif before != "eager":
            model.set_attn_implementation(before)


@dataclass
class TeacherPass:
    """What one no-grad teacher forward recorded: attention calls and block calls with outputs."""

    attention: dict[str, Call] = field(default_factory=dict)
    blocks: dict[str, Call] = field(default_factory=dict)
    logits: torch.Tensor | None = None


@torch.no_grad()
def run_teacher(
    teacher: nn.Module,
    input_ids: torch.Tensor,
    attention_paths: list[str] = (),  # type: ignore[assignment]
    block_paths: list[str] = (),  # type: ignore[assignment]
    keep_logits: bool = False,
) -> TeacherPass:
    """One teacher forward recording the calls stages 1/2 need.

    For attention probabilities, call it inside :func:`eager_attention` and replay the recorded
    attention calls inside the same context.
    """
    result = TeacherPass()
    with record_calls(teacher, list(attention_paths), outputs=True) as attn, record_calls(
        teacher, list(block_paths), outputs=True
    ) as blocks:
        out = teacher(input_ids=input_ids, use_cache=False)
    result.attention, result.blocks = attn, blocks
    if keep_logits:
        result.logits = out.logits
    return result



@dataclass
class AttentionQK:
    """One recorded attention computation: ``softmax(scale q k^T + mask)`` with q (b, h, L, d), k (b, hk, L, d).

    ``plain``: it was a causal softmax with nothing else (no mask tensor, no window shorter than
    ``L``, no soft-capping, sinks or dropout); ``why`` says what made it not plain.
    """

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    plain: bool
    why: str | None = None


_RECORDING: dict[int, tuple[str, dict[str, AttentionQK]]] = {}  # id(attention module) -> (path, sink)


def _recording_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    target = _RECORDING.get(id(module))
    if target is not None:
        path, sink = target
        L = query.shape[2]
        window = kwargs.get("sliding_window")
        extra = sorted(k for k, v in kwargs.items() if k not in PLAIN_KWARGS and v is not None)
        why = None
        if window is not None and window < L:
            why = f"a sliding window of {window} < {L} tokens"
        elif attention_mask is not None:
            why = "an attention mask tensor (padding, or a mask of the family's own)"
        elif extra:
            why = f"attention arguments {extra}"
        elif kwargs.get("dropout", 0.0) or not getattr(module, "is_causal", True):
            why = "dropout or a non-causal attention"
        scale = kwargs.get("scaling")
        sink[path] = AttentionQK(query.detach(), key.detach(), float(query.shape[-1] ** -0.5 if scale is None else scale),
                                 why is None, why)
    if kwargs.get("softcap") is not None:  # Gemma2: SDPA has no soft-capping
        return _softcapped_attention(query, key, value, attention_mask, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _softcapped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    """``softmax(cap * tanh(scale q k^T / cap) + mask) v`` in plain torch, shaped like SDPA's output ``(b, L, h, p)``.

    ``attention_mask``: what the recording mask function (``sdpa_mask``) built, a boolean ``(b, 1, L, S)``
    (True: attend), or None for a plain causal mask.
    """
    b, h, L, p = query.shape
    S = key.shape[2]
    rep = h // key.shape[1]
    k = key.repeat_interleave(rep, dim=1)  # (b, g, S, p) -> (b, h, S, p)
    v = value.repeat_interleave(rep, dim=1)
    scale = kwargs.get("scaling") or p**-0.5
    cap = float(kwargs["softcap"])
    scores = torch.tanh(query @ k.transpose(-1, -2) * scale / cap) * cap  # (b, h, L, S)
    if attention_mask is None:
        allowed = torch.ones(L, S, dtype=torch.bool, device=query.device).tril(S - L)  # causal, queries last
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :S]
    else:
        scores = scores + attention_mask[..., :S]
        allowed = None
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = scores.float().softmax(dim=-1).to(query.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), None  # (b, h, L, p) -> (b, L, h, p)


def _register_recording() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(RECORDING_IMPLEMENTATION, _recording_attention)
    AttentionMaskInterface.register(RECORDING_IMPLEMENTATION, sdpa_mask)


@contextmanager
def record_attention_qk(model: nn.Module, paths: list[str]) -> Iterator[dict[str, AttentionQK]]:
    """Within the block, ``model`` runs SDPA attention and records ``q``/``k`` of the attention modules at ``paths``.

    A path whose attention never calls the ``AttentionInterface`` (or a model that refuses the
    recording implementation) is absent from the yielded dict; the caller falls back to replaying
    the eager attention (:class:`~verify.stage1_matrix.MatrixOrientation`).
    """
    _register_recording()
    sink: dict[str, AttentionQK] = {}
    before = model.config._attn_implementation
    if not can_switch_attention(model):  # its attention never calls the AttentionInterface (Falcon, GPT-Neo)
        yield sink
        return
    try:
        model.set_attn_implementation(RECORDING_IMPLEMENTATION)
    except (ValueError, NotImplementedError):  # a family without AttentionInterface support: nothing is recorded
        yield sink
        return
    if model.config._attn_implementation != RECORDING_IMPLEMENTATION:  # refused with a warning (Falcon)
        yield sink
        return
    for path in paths:
        _RECORDING[id(model.get_submodule(path))] = (path, sink)
    try:
        yield sink
    finally:
        model.set_attn_implementation(before)
        for path in paths:
            _RECORDING.pop(id(model.get_submodule(path)), None)
