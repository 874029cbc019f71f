"""The check every export ends with: plain transformers loads the written directory and computes the student.

``AutoModelForCausalLM.from_pretrained(directory)`` -- no surgery code, no remote code -- is run
next to the student (both in float32 on the CPU) on a fixed probe batch: the logits must agree
within :data:`LOGITS_RTOL` of their scale, and greedy cached generation must give the same tokens.
A mapping mistake moves logits by O(1); what is left at float32 is summation order (~1e-6).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .target import ExportError

LOGITS_RTOL = 1e-5  # max |native - student| / max(1, max |student logits|)
PROBE_SHAPE = (2, 24)  # batch, tokens of the logits probe
PROMPT_TOKENS = 8  # greedy generation: prompt length (the first tokens of the probe) ...
NEW_TOKENS = 8  # ... and tokens generated
PROBE_SEED = 0


@dataclass
class Exactness:
    """What the check measured (recorded in the provenance and the model card)."""

    max_abs_logit_diff: float
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
    got = native(ids).logits.float()
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    prompt = ids[:, :PROMPT_TOKENS]
    pad = native.config.pad_token_id if native.config.pad_token_id is not None else 0
    same = torch.equal(_greedy(native, prompt, pad), _greedy(student, prompt, pad))
    result = Exactness(diff, scale, ids.numel(), NEW_TOKENS * prompt.shape[0], same, transformers.__version__)
    if not diff <= LOGITS_RTOL * max(1.0, scale) or not same:
        raise ExportError(
            f"the written {type(native).__name__} does not compute the student (max |logit diff| {diff:.3g} at logit "
            f"scale {scale:.3g}; greedy tokens {'equal' if same else 'differ'}) with transformers "
            f"{transformers.__version__}; nothing was written. Report it with the student's config.json"
        )
    return result
