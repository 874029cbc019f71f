"""Tokenizing documents, and what identifies a tokenizer and its ids on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def encode_texts(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text; text that spells a special token (``"</s>"``) stays text.

    ``add_special_tokens=True`` adds what the tokenizer adds by default (e.g. Llama-3's
    and Gemma's BOS; nothing for SmolLM2 or the byte tokenizer).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]
    was = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return [enc.ids for enc in backend.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)]
    finally:
        backend.encode_special_tokens = was


def separator_id(tokenizer: Any) -> int | None:
    """The token placed after every document: EOS (else BOS, else none)."""
    for name in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Content hash of everything that decides a tokenizer's ids (vocabulary, merges, pre/post-processing)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary, specials and name
        vocab = sorted(tokenizer.get_vocab().items())
        digest.update(json.dumps([vocab, getattr(tokenizer, "name_or_path", "")]).encode())
    specials = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id")}
    digest.update(json.dumps(specials, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def token_dtype(tokenizer: Any) -> np.dtype:
    """On-disk id type: little-endian uint16 when every id fits, else int32."""
    size = max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))
    return np.dtype("<u2") if size <= 1 << 16 else np.dtype("<i4")


def tokens_fingerprint(tokens: torch.Tensor) -> str:
    """Short content hash of a token tensor, as int64 (checked when a cursor is restored).

    Hashes in slices, so a tensor over an on-disk file is never materialised whole.
    """
    digest = hashlib.sha256()
    flat = tokens.reshape(-1)
    step = 1 << 24
    for start in range(0, flat.numel(), step):
        digest.update(flat[start : start + step].to(torch.int64).contiguous().numpy())
    return digest.hexdigest()[:16]
