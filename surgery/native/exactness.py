"""The check every export ends with: plain transformers loads the written directory and computes the student.

``AutoModelForCausalLM.from_pretrained(directory)`` -- no surgery code, no remote code -- runs
next to the student (both in float32 on the CPU) on a fixed probe batch ``(b, L)``:

1. full-sequence logits must agree within :data:`LOGITS_RTOL` of their scale;
2. the native model's *cached* decoding (a prefill of :data:`PREFILL` tokens, then one token at a
   time through its own cache) must give the same logits at every later position;
3. greedy ``generate`` (each model with its own cache) is compared token for token.

A layout mistake moves logits by O(1) (a B/C swap, a norm over the wrong groups: 1e-1 to 1 at
logits ~3); two float32 implementations of the same model differ by rounding, which grows with
depth and logit scale: on SmolLM2-135M students (logits ~30) 3e-4 to 5e-4 (full sequence) and up
to 1.5e-3 (cached decoding), where the student itself is ~5e-4 from its own float64 logits. Hence
a tolerance relative to the scale, with room for deeper models. 1 and 2 raise
:class:`ExportError`; 3 is recorded, and greedy tokens that differ while 1 and 2 hold (a near-tie
of the top two logits) are logged as a warning.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hf_conventions import cache_keyword, output_cache
from .target import ExportError

log = logging.getLogger("surgery")

LOGITS_RTOL = 1e-3  # max |native - student| <= LOGITS_RTOL * max(1, max |student logits|)
PROBE_SHAPE = (2, 24)  # batch, tokens of the probe
PREFILL = 16  # cached decoding: prompt length, then the remaining tokens one by one
PROMPT_TOKENS = 8  # greedy generate: prompt length (the probe's first tokens) ...
NEW_TOKENS = 8  # ... and tokens generated per row
PROBE_SEED = 0


@dataclass
class Exactness:
    """What the check measured (recorded in the provenance and the model card)."""

    max_abs_logit_diff: float  # full-sequence forward
    max_abs_cached_logit_diff: float  # the native model decoding through its cache
    logit_scale: float  # max |student logits|
    probe_tokens: int
    greedy_tokens: int
    greedy_equal: bool
    transformers: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_ids(vocab_size: int) -> torch.Tensor:
    """The fixed probe batch ``(b, L)`` of token ids."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=g)


def cached_logits(model: nn.Module, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits ``(b, L - prefill, vocab)`` of positions ``prefill..L-1``, decoded one token at a time through the cache."""
    keyword = cache_keyword(model.forward)
    b, L = ids.shape
    out = model(ids[:, :prefill], position_ids=torch.arange(prefill)[None].expand(b, -1), use_cache=True)
    steps = []
    for t in range(prefill, L):
        out = model(ids[:, t : t + 1], position_ids=torch.full((b, 1), t), use_cache=True, **{keyword: output_cache(out)})
        steps.append(out.logits[:, -1])  # (b, vocab)
    return torch.stack(steps, dim=1)


def _greedy(model: nn.Module, prompt: torch.Tensor, pad: int) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=pad, eos_token_id=None)[:, prompt.shape[1]:]


@torch.no_grad()
def check_exact(directory: Path, student: nn.Module) -> Exactness:
    """Load ``directory`` with plain transformers and compare it with ``student`` (float32); raise on a mismatch."""
    import transformers
    from transformers import AutoModelForCausalLM

    native = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True).eval()
    ids = probe_ids(native.config.vocab_size)
    want = student(ids).logits.float()  # (b, L, vocab)
    full = (native(ids).logits.float() - want).abs().max().item()
    cached = (cached_logits(native, ids, PREFILL).float() - want[:, PREFILL:]).abs().max().item()
    scale = want.abs().max().item()
    prompt = ids[:, :PROMPT_TOKENS]
    pad = native.config.pad_token_id if native.config.pad_token_id is not None else 0
    same = torch.equal(_greedy(native, prompt, pad), _greedy(student, prompt, pad))
    result = Exactness(full, cached, scale, ids.numel(), prompt.shape[0] * NEW_TOKENS, same, transformers.__version__)
    tolerance = LOGITS_RTOL * max(1.0, scale)
    if not (full <= tolerance and cached <= tolerance):
        raise ExportError(
            f"the written {type(native).__name__} does not compute the student with transformers "
            f"{transformers.__version__}: max |logit diff| {full:.3g} (full sequence), {cached:.3g} (cached "
            f"decoding) at logit scale {scale:.3g}, tolerance {tolerance:.3g}; nothing was written. Report it with "
            "the student's config.json"
        )
    if not same:
        log.warning("greedy tokens of the export and the student differ although their logits agree within %.3g: "
                    "a near-tie of the top two logits on the probe", tolerance)
    return result
