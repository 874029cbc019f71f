"""Per-token validity from the attention masks transformers builds (causal, sliding, padded, cached)."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import causal_mask_function, eager_mask, sdpa_mask, sliding_window_causal_mask_function

from surgery.mixers._common import token_validity

PADDING = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize("builder", [sdpa_mask, eager_mask])
@pytest.mark.parametrize("mask_function", [causal_mask_function, sliding_window_causal_mask_function(3)])
@pytest.mark.parametrize(("q", "past"), [(8, 0), (1, 7), (3, 5)])
def test_diagonal_gives_padding(builder, mask_function, q: int, past: int) -> None:
    mask = builder(
        batch_size=3,
        q_length=q,
        kv_length=past + q,
        q_offset=past,
        mask_function=mask_function,
        attention_mask=PADDING,
        allow_is_causal_skip=False,
    )
    assert mask.ndim == 4 and mask.dtype == (torch.bool if builder is sdpa_mask else torch.float32)
    assert torch.equal(token_validity(mask, q), PADDING[:, past:])


def test_sliding_window_cache_offsets() -> None:
    # a sliding-window KV cache keeps window-1 past keys: kv columns start at an offset, the current tokens are last
    mask = sdpa_mask(
        batch_size=3,
        q_length=2,
        kv_length=4,
        q_offset=6,
        kv_offset=4,
        mask_function=sliding_window_causal_mask_function(3),
        attention_mask=PADDING,
        allow_is_causal_skip=False,
    )
    assert torch.equal(token_validity(mask, 2), PADDING[:, 6:])


def test_none_2d_and_errors() -> None:
    assert token_validity(None, 4) is None
    assert torch.equal(token_validity(PADDING.long(), 2), PADDING[:, -2:])
    with pytest.raises(ValueError, match="smaller"):
        token_validity(torch.zeros(1, 1, 2, 2, dtype=torch.bool), 3)
    with pytest.raises(TypeError, match="tensor attention mask"):
        token_validity(object(), 3)  # type: ignore[arg-type]
