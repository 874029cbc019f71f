"""Options of the Toeplitz mixer (:mod:`surgery.mixers.toeplitz`), without torch."""

from __future__ import annotations

from pydantic import Field

from .structured import GatedHeadsInit, GatedHeadsParams


class ToeplitzParams(GatedHeadsParams):
    """Shape of a Toeplitz (causal global convolution) mixer (``replace[i].params``)."""

    kernel_size: int = Field(
        2048, gt=0, description="kernel length K: token t mixes tokens t-K+1..t (decoding keeps the last K-1 inputs)"
    )


class ToeplitzInit(GatedHeadsInit):
    """Initialisation of a Toeplitz mixer (``replace[i].init``)."""

    init_length: float = Field(
        16.0, gt=0, description="initial kernel k[j] ~ exp(-j / init_length), normalised to sum 1 (a causal moving average)"
    )


__all__ = ["ToeplitzInit", "ToeplitzParams"]
