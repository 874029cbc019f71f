"""Fixed-size KV cache for the attention layers a hybrid student keeps, so its decode step has fixed shapes.

A kept attention layer's :class:`~transformers.cache_utils.DynamicLayer` grows by one column per
token, which a captured CUDA graph cannot follow. :func:`freeze_kv_layers` swaps each such slot
for a :class:`StaticKVLayer`: keys and values ``(b, h_kv, C + 1, d)`` allocated once, the
prefill copied in. ``C`` history columns hold tokens ``0 .. C-1``; the last column always holds
the current token. Each step writes the new key and value both into that last column and into
history column ``slot`` (a device tensor the step advances in place, so replays need no host),
and the attention sees all ``C + 1`` columns through a fixed-shape additive mask
:class:`KVMask` that hides the unwritten tail and column ``slot`` itself (the current token
counts once, in the last column).

Why the current token sits last: it is what every transformers cache does, and what the SSM
mixers assume when they read their token's validity off the 4-D mask
(:func:`surgery.mixers._common.token_validity` reads the last key column). Mask and columns are
plain tensors built with public ``torch`` ops, so nothing here depends on the transformers
version beyond ``CacheLayerMixin``'s abstract API (the same in 5.17 and 5.24).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

__all__ = ["KVMask", "StaticKVLayer", "freeze_kv_layers"]


class StaticKVLayer(CacheLayerMixin):
    """One kept attention layer's KV in fixed buffers ``(b, h_kv, C + 1, d)``; see the module docstring.

    ``slot``: ``(1,)`` long, the history column of the current token (shared by all layers and
    advanced by the decoder). ``seen``: the host-side length reported to transformers, constant
    (the prefill length) so that nothing the forward derives from it changes between steps.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, seen: int) -> None:
        super().__init__()
        self.keys, self.values, self.slot, self.seen = keys, values, slot, seen
        self.is_initialized = True
        self.device, self.dtype = keys.device, keys.dtype

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated at construction

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the current token's ``(b, h_kv, 1, d)`` key and value; return the full buffers."""
        k, v = key_states.to(self.dtype), value_states.to(self.dtype)
        self.keys.index_copy_(2, self.slot, k)  # history column `slot` (masked during this step)
        self.values.index_copy_(2, self.slot, v)
        self.keys[:, :, -1:].copy_(k)  # the current-token column
        self.values[:, :, -1:].copy_(v)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_max_length(self) -> int:
        return self.keys.shape[2] - 1


class KVMask:
    """The additive attention mask ``(b, 1, 1, C + 1)`` over a :class:`StaticKVLayer`'s columns.

    0 where a key may be attended (written history, the last column), the dtype's minimum
    elsewhere. ``prompt_mask (b, L)``: the prefill's padding mask (1 = real token), or None.
    """

    def __init__(self, batch: int, capacity: int, seen: int, dtype: torch.dtype, device: torch.device,
                 prompt_mask: torch.Tensor | None = None) -> None:
        self.blocked = torch.finfo(dtype).min
        self.mask = torch.full((batch, 1, 1, capacity + 1), self.blocked, dtype=dtype, device=device)
        self.mask[..., -1] = 0
        if prompt_mask is None:
            self.mask[..., :seen] = 0
        else:
            real = prompt_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (b, 1, 1, L)
            self.mask[..., :seen].masked_fill_(real, 0)

    def admit(self, slot: torch.Tensor) -> None:
        """Unmask history column ``slot`` (its token has just been written), in place."""
        self.mask.index_fill_(-1, slot, 0)


def freeze_kv_layers(cache: Any, capacity: int, slot: torch.Tensor) -> list[StaticKVLayer]:
    """Replace every KV slot of ``cache`` (a SurgeryCache after prefill) by a :class:`StaticKVLayer` of ``capacity``.

    ``capacity``: history columns, the most tokens (prompt included) the layers will hold. Raises
    ``NotImplementedError`` for a slot that is not a plain full-attention ``DynamicLayer``
    (sliding windows, offloading, quantised KV).
    """
    from .cache import SSMCacheLayer

    frozen = []
    for idx, layer in enumerate(cache.layers):
        if isinstance(layer, SSMCacheLayer):
            continue
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise NotImplementedError(
                f"cache layer {idx} is a {type(layer).__name__}{'' if layer.is_initialized else ' (empty)'}; a static "
                "decode step handles kept full-attention layers (plain DynamicLayer after a prefill) only"
            )
        b, h, seen, d = layer.keys.shape  # (b, h_kv, L, d)
        if seen > capacity:
            raise ValueError(f"the prompt holds {seen} tokens but the static KV cache was sized for {capacity}")
        keys = layer.keys.new_zeros(b, h, capacity + 1, d)  # (b, h_kv, C + 1, d)
        values = layer.values.new_zeros(b, h, capacity + 1, layer.values.shape[-1])
        keys[:, :, :seen] = layer.keys
        values[:, :, :seen] = layer.values
        cache.layers[idx] = frozen_layer = StaticKVLayer(keys, values, slot, seen)
        frozen.append(frozen_layer)
    return frozen
