"""``layers: auto``: which attention layers a hybrid keeps, chosen from the teacher's own activations.

A rule ``{mixer: keep, layers: auto, count: k}`` keeps the ``k`` attention layers whose output
changes the residual stream most. Each layer's score is the mean, over the tokens of a few batches
of the recipe's text, of ``1 - cos(x, x + attn(x))``: ``x`` is the hidden state entering the decoder
layer and ``attn(x)`` the attention module's output (its contribution to the residual). A layer
whose attention barely turns the residual stream (score near 0) is the cheapest to replace; one
that turns it most is kept. This is the attention-importance measure of He et al. 2024, "What
Matters in Transformers? Not All Attention Is Needed" (arXiv 2406.15786), who drop the
low-scoring attention layers; here the high-scoring ones stay attention and the rest become mixers.

The choice is made once, before the rewrite, from a fixed sample of the recipe's training text
(:func:`ranking_batches`), so ``surgery plan`` and ``surgery apply`` make the same choice; apply
writes the explicit layer list into the student's ``recipe.resolved.yaml`` and its report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rewrites.adapters import get_adapter

from .errors import SelectionError
from .recipe import AUTO_LAYERS, ReplaceRule

RANKING_TOKENS = 16_384  # training tokens scored (plan and apply use the same sample)
RANKING_SEQ_LEN = 512


@dataclass(frozen=True)
class LayerChoice:
    """The outcome of a ``layers: auto`` rule: every layer's score and the layers kept."""

    rule_index: int
    scores: dict[int, float]  # layer -> mean 1 - cos(x, x + attn(x))
    kept: list[int]  # the ``count`` highest scores, ascending layer order
    tokens: int  # tokens the scores were measured on

    def to_text(self) -> str:
        ranked = sorted(self.scores, key=lambda i: -self.scores[i])
        top = ", ".join(f"{i} ({self.scores[i]:.3f})" for i in ranked[: len(self.kept)])
        low = ", ".join(f"{i} ({self.scores[i]:.3f})" for i in ranked[-3:])
        return (
            f"rule #{self.rule_index} layers: auto keeps attention in layers {self.kept}: the {len(self.kept)} of "
            f"{len(self.scores)} whose attention turns the residual stream most, mean 1 - cos(x, x + attn(x)) over "
            f"{self.tokens} tokens of the recipe's text: {top}; lowest: {low}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"rule_index": self.rule_index, "kept": self.kept, "tokens": self.tokens,
                "scores": {str(i): s for i, s in self.scores.items()}}


def _output(out: Any) -> torch.Tensor:
    """The attention module's hidden-state output from its return value (a tensor or a tuple)."""
    tensor = out[0] if isinstance(out, (tuple, list)) else out
    if not torch.is_tensor(tensor):
        raise SelectionError(f"layers: auto: an attention module returned {type(tensor).__name__}, not a tensor")
    return tensor


@torch.no_grad()
def attention_importance(model: nn.Module, batches: Sequence[torch.Tensor]) -> tuple[dict[int, float], int]:
    """Per decoder layer, the mean of ``1 - cos(x, x + attn(x))`` over every token of ``batches``.

    batches: (b, L) token ids. Returns ({layer: score}, tokens scored).
    """
    adapter = get_adapter(model)
    layers = dict(adapter.decoder_layers())
    views = adapter.attention_views()
    sums = {v.layer: torch.zeros((), dtype=torch.float64) for v in views}
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for v in views:
        layer_path = v.path.rsplit(f".{v.layer}.", 1)[0] + f".{v.layer}"
        if layer_path not in layers:
            raise SelectionError(f"layers: auto: cannot find the decoder layer of {v.path} (looked for {layer_path})")

        def pre(module: nn.Module, args: tuple, kwargs: dict, i: int = v.layer) -> None:
            inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def post(module: nn.Module, args: tuple, out: Any, i: int = v.layer) -> None:
            x = inputs.pop(i).float()  # (b, L, d): the residual stream entering the layer
            y = x + _output(out).float()  # (b, L, d)
            sums[i] += (1 - F.cosine_similarity(x, y, dim=-1)).double().sum().cpu()

        handles.append(layers[layer_path].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(v.module.register_forward_hook(post))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        device = next(model.parameters()).device
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise SelectionError("layers: auto: no text to score the attention layers on")
    return {i: (s / tokens).item() for i, s in sums.items()}, tokens


def has_auto(rules: Sequence[ReplaceRule]) -> bool:
    return any(rule.layers == AUTO_LAYERS for rule in rules)


def resolve_auto_layers(rules: Sequence[ReplaceRule], model: nn.Module,
                        batches: Sequence[torch.Tensor]) -> tuple[list[ReplaceRule], LayerChoice | None]:
    """``rules`` with a ``layers: auto`` rule made explicit (the ``count`` highest-scoring layers)."""
    rules = list(rules)
    auto = [i for i, rule in enumerate(rules) if rule.layers == AUTO_LAYERS]
    if not auto:
        return rules, None
    index = auto[0]
    rule = rules[index]
    scores, tokens = attention_importance(model, batches)
    count = rule.count or 0
    if count > len(scores):
        raise SelectionError(
            f"replace[{index}]: count {count} is more than the model's {len(scores)} attention layers"
        )
    kept = sorted(sorted(scores, key=lambda i: (-scores[i], i))[:count])
    rules[index] = rule.model_copy(update={"layers": kept, "count": None})
    return rules, LayerChoice(index, scores, kept, tokens)


def ranking_batches(recipe: Any, tokenizer: Any) -> list[torch.Tensor]:
    """The fixed sample ``layers: auto`` is scored on: the first training tokens of the recipe's text.

    Sampled sources (``builtin:teacher-samples``) are left out when others exist, so that ``plan``
    need not sample from the teacher; the held-out split is never used.
    """
    from .data import Corpus

    data = recipe.data
    plain = [s for s in data.sources if s.source != "builtin:teacher-samples"]
    if plain and len(plain) < len(data.sources):
        data = data.model_copy(update={"sources": plain})
    if not plain:
        raise SelectionError(
            "layers: auto scores the attention layers on the recipe's text, but its only source is "
            "builtin:teacher-samples; add a text source (e.g. builtin:python-stdlib or builtin:wikipedia)"
        )
    seq_len = min(RANKING_SEQ_LEN, data.seq_len)
    corpus = Corpus.build(data, tokenizer, seed=recipe.data_seed, max_tokens=RANKING_TOKENS,
                          heldout_tokens=data.seq_len, storage="memory")
    n = corpus.train.numel() // seq_len
    if n == 0:
        raise SelectionError(f"layers: auto: the recipe's text gave fewer than {seq_len} training tokens to score on")
    rows = corpus.train[: n * seq_len].view(n, seq_len)  # (n, seq_len)
    return list(rows.split(4))
