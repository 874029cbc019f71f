"""Forward hooks that record how modules were called (no forked model files)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


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


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention (which returns probabilities) inside the block."""
    config = model.config
    before = config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
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

