"""The contract between rewrite rules, mixers, stages and the student.

A :class:`Mixer` stands where a teacher attention module stood. It is called by
the unchanged teacher decoder block with the family's attention call contract
(``hidden_states`` by keyword or positionally, a 4-D ``attention_mask``, the
cache under one of :data:`surgery.hf_conventions.ATTENTION_CACHE_KEYWORDS`) and must
return ``(output[b, L, d_model], None)``. A call it does not recognise (a cache under
another name) raises rather than running without state. Subclasses implement the pure pieces:

* :meth:`Mixer.mix` -- the sequence mixer on ``u (b, L, d_model)``,
* :meth:`Mixer.materialize` -- its mixing matrix ``(b, h, L, L)`` for stage 1,
* :meth:`Mixer.ssm_output` -- the SSM part alone (post-conv ``x`` and ``y``), which the matrix maps,
* :meth:`Mixer.matrix_parameters` -- what builds that matrix (trained in stage 1),
* :meth:`Mixer.init_from_attention` -- weight transfer from :class:`AttentionWeights`,
* :meth:`Mixer.weight_views` -- head-major views used to check transfers.

Padding and state: :meth:`Mixer.forward` reads each current token's validity off the 4-D
mask the block passes (:func:`surgery.mixers._common.token_validity`) and the mixer's state
slot off the cache (:class:`surgery.cache.SurgeryCache`; a plain ``DynamicCache`` is upgraded
in place, other caches raise). Padding tokens contribute nothing to the state. A cache whose
other layers have seen tokens while this layer's slot is empty -- the state went missing
between steps -- raises :class:`surgery.cache.MissingStateError` instead of starting afresh.

Weights of the teacher attention reach a mixer in one common layout
(:class:`AttentionWeights`), whatever the family's fused / transposed layout;
the per-family adapters in ``rewrites/adapters`` produce it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..cache import SSMCacheLayer, check_continuation_has_state, surgery_cache
from ..hf_conventions import attention_call_cache
from ..mixer_options import MixerInit, MixerParams  # torch-free: recipes validate without torch
from ..ops.stage1 import MatrixFactors
from ._common import token_validity


TRANSFER_OPTIONS = ("q_to_C", "k_to_B", "v_to_x", "o_to_out")  # init options that copy teacher weights


@dataclass(frozen=True)
class AttentionShape:
    """Head geometry of one teacher attention node."""

    d_model: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA groups); == n_heads without GQA
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, head: int) -> int:
        """The key/value head that query head ``head`` reads."""
        return head // self.group_size


@dataclass
class AttentionWeights:
    """Teacher attention weights in one layout for all families (detached copies).

    For input ``u (d_model,)`` and head ``h``: ``q_h = q[h] @ u + q_bias[h]``
    (likewise k, v with key/value heads), and the output is
    ``sum_h o[:, h, :] @ attn_h + o_bias``.
    """

    shape: AttentionShape
    q: torch.Tensor  # (n_heads, head_dim, d_model)
    k: torch.Tensor  # (n_kv_heads, head_dim, d_model)
    v: torch.Tensor  # (n_kv_heads, head_dim, d_model)
    o: torch.Tensor  # (d_model, n_heads, head_dim)
    q_bias: torch.Tensor | None = None  # (n_heads, head_dim)
    k_bias: torch.Tensor | None = None  # (n_kv_heads, head_dim)
    v_bias: torch.Tensor | None = None  # (n_kv_heads, head_dim)
    o_bias: torch.Tensor | None = None  # (d_model,)

    def __post_init__(self) -> None:
        s = self.shape
        expected = {
            "q": (s.n_heads, s.head_dim, s.d_model),
            "k": (s.n_kv_heads, s.head_dim, s.d_model),
            "v": (s.n_kv_heads, s.head_dim, s.d_model),
            "o": (s.d_model, s.n_heads, s.head_dim),
        }
        for name, want in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != want:
                raise ValueError(f"AttentionWeights.{name} has shape {got}, expected {want}")


class Mixer(nn.Module):
    """A sequence mixer spliced in place of an attention module.

    Subclasses set ``name``, ``params_model`` and ``init_model`` and implement
    the abstract methods. ``layer_idx`` is the decoder layer index (the cache
    slot); ``params`` must be fully resolved (no ``None`` left) so that the
    student can be rebuilt from its config alone.
    """

    name: ClassVar[str] = ""
    params_model: ClassVar[type[MixerParams]] = MixerParams
    init_model: ClassVar[type[MixerInit]] = MixerInit

    def __init__(self, d_model: int, params: MixerParams, layer_idx: int) -> None:
        super().__init__()
        if not isinstance(params, self.params_model):  # a dict, or the base model from a generic caller
            raw = params if isinstance(params, dict) else params.model_dump()
            params = self.params_model.model_validate(raw)
        if d_model <= 0:
            raise ValueError(f"{self.name or type(self).__name__}: d_model must be positive, got {d_model}")
        self.d_model = d_model
        self.params = params
        self.layer_idx = layer_idx

    # ------------------------------------------------------------------ construction

    @classmethod
    def resolve_params(cls, params: MixerParams, shape: AttentionShape) -> MixerParams:
        """Fill teacher-dependent defaults (``None`` fields) from the attention's shape.

        Raises ``ValueError`` naming the parameter when params and shape are incompatible.
        """
        return params

    def resolved(self) -> MixerParams:
        """``self.params``; raises ``ValueError`` naming the first field still None."""
        for name, value in self.params:
            if value is None:
                raise ValueError(
                    f"{self.name or type(self).__name__}: {name} is not set; resolve the params against the teacher "
                    "(resolve_params) or set it"
                )
        return self.params

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, " + ", ".join(f"{k}={v}" for k, v in self.params.model_dump().items())

    # ------------------------------------------------------------------ HF call contract

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """Attention call contract of every supported family -> ``(output, None)``.

        ``hidden_states`` comes by keyword or as the first positional argument; the cache under
        one of the known keywords (:func:`surgery.hf_conventions.attention_call_cache`, which
        raises on a cache handed over any other way); everything else (rotary embeddings,
        ``use_cache``) is ignored. In eval mode, ``position_ids`` that continue a sequence
        (all > 0) while this layer has no state raise
        :class:`~surgery.cache.MissingStateError` (one host read per such call; never while training).
        """
        hidden_states = kwargs.pop("hidden_states", None)
        if hidden_states is None:
            hidden_states, args = args[0], args[1:]
        cache = attention_call_cache(args, kwargs)
        if not self.training:
            check_continuation_has_state(cache, self.layer_idx, kwargs.get("position_ids"))
        return self.mix_with_contract(hidden_states, kwargs.get("attention_mask"), cache), None

    def mix_with_contract(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any) -> torch.Tensor:
        """Turn the family's mask into per-token validity (see :func:`token_validity`) and call :meth:`mix`."""
        return self.mix(hidden_states, token_validity(attention_mask, hidden_states.shape[1]), cache)

    def state_slot(self, cache: Any, n_tokens: int) -> SSMCacheLayer | None:
        """This layer's recurrent state in ``cache`` (a Cache, an :class:`SSMCacheLayer` or None).

        ``n_tokens``: the current call's length. Raises :class:`~surgery.cache.MissingStateError`
        when the slot is empty although the cache's other layers have seen earlier tokens.
        """
        if cache is None or isinstance(cache, SSMCacheLayer):
            return cache
        full = surgery_cache(cache)
        full.check_state_present(self.layer_idx, n_tokens)
        return full.ssm_layer(self.layer_idx)

    # ------------------------------------------------------------------ pure pieces

    def mix(self, u: torch.Tensor, mask: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """Mix ``u (b, L, d_model)``; ``mask (b, L)`` is True on real tokens. Returns ``(b, L, d_model)``.

        Padding tokens contribute nothing (zero input, decay 1, zero conv input), so a left-padded
        row gives the same outputs on its real tokens as the unpadded row. ``cache``: a Cache
        (this layer's slot is used and updated; see :mod:`surgery.cache`), an
        :class:`SSMCacheLayer`, or None (no state carried).
        """
        raise NotImplementedError

    def materialize(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mixing matrix ``(b, h, L, L)``; rows are output positions, like attention probabilities.

        It acts on the post-conv ``x`` of :meth:`ssm_output`: ``einsum("bhls,bshp->blhp", M, x)``
        is the SSM part of the forward. Columns of padding tokens (``mask`` False) are zero.
        Returned in float32 (float64 for float64 inputs). Built from :meth:`matrix_factors`.
        """
        M = self.matrix_factors(u, mask).materialize()  # (b, h, L, L)
        if mask is not None:
            M = M * mask[:, None, None, :].to(M.dtype)
        return M

    def has_matrix_factors(self) -> bool:
        """Whether :meth:`matrix_factors` is available (SSD form); stage 1 materialises the matrix otherwise."""
        return type(self).matrix_factors is not Mixer.matrix_factors

    def matrix_factors(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> MatrixFactors:
        """What builds the mixing matrix of ``u (b, L, d_model)`` (stage 1 fuses it with the teacher's ``q``/``k``)."""
        raise NotImplementedError

    def ssm_output(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The SSM part of the forward, without state: post-conv ``x (b, L, h, p)`` and ``y (b, L, h, p)``
        (before the gate / norm and out_proj)."""
        raise NotImplementedError

    @property
    def n_matrix_heads(self) -> int:
        """Heads ``h`` of :meth:`materialize` (must equal the teacher's query heads for stage 1)."""
        raise NotImplementedError

    def matrix_parameters(self) -> list[nn.Parameter]:
        """Parameters that build the mixing matrix (trained in stage 1)."""
        raise NotImplementedError

    def init_from_attention(self, weights: AttentionWeights | None, init: MixerInit) -> dict[str, str]:
        """Initialise (and transfer weights where ``init`` asks). ``weights`` is None when nothing is transferred.

        Returns a record ``{mixer tensor (or slice): teacher source}`` for the diff and the model card.
        """
        raise NotImplementedError

    def requested_transfers(self, weights: AttentionWeights | None, init: MixerInit) -> list[str]:
        """The ``*_to_*`` transfer options ``init`` turns on; an error when they have no weights to copy."""
        asked = [name for name in TRANSFER_OPTIONS if getattr(init, name, False)]
        if weights is None and asked:
            raise ValueError(f"{self.name}: init {', '.join(asked)} needs the teacher's attention weights")
        return asked

    def decode_projections(self) -> list[nn.Linear]:
        """The linears :meth:`mix` applies to its input, in order, that a decode step may run as one matmul.

        The static decoder stacks them (:class:`~surgery.mixers._common.FusedProjection`) into the
        cache slot it owns, and :meth:`mix` uses that for one-token calls. Empty (the default): no fusion.
        """
        return []

    def weight_views(self) -> dict[str, torch.Tensor]:
        """Head-major views of transferable weights, in :class:`AttentionWeights` layout.

        Keys among ``"C"`` (like q), ``"B"`` (like k), ``"x"`` (like v): ``(heads, dim, d_model)``;
        ``"out"`` (like o): ``(d_model, heads, head_dim)``.
        """
        raise NotImplementedError
