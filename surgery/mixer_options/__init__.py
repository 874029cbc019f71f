"""Mixer options (``replace[i].params`` / ``init``) as Pydantic models that import without torch.

``surgery validate`` checks a recipe's ``params``/``init`` against these models without
importing torch or transformers; the mixers in :mod:`surgery.mixers` use the same classes as
their ``params_model`` / ``init_model``, and :mod:`rewrites.rule_options` declares them for the
recipe. A mixer whose option models live in its own (torch) module validates too, after the full
rule registry is loaded (:func:`rewrites.registry.rule_options`), only more slowly.
"""

from __future__ import annotations

from pydantic import ConfigDict

from ..strict_numbers import NumbersNotBools


class MixerParams(NumbersNotBools):
    """Base of every mixer's parameter model (``replace[i].params``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MixerInit(NumbersNotBools):
    """Base of every mixer's initialisation options (``replace[i].init``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_divides(owner: str, small: tuple[str, int], big: tuple[str, int]) -> None:
    """Raise ``ValueError`` unless ``small`` divides ``big``, naming both parameters."""
    if big[1] % small[1]:
        raise ValueError(f"{owner}: {big[0]} ({big[1]}) must be a multiple of {small[0]} ({small[1]})")


__all__ = ["MixerInit", "MixerParams", "check_divides"]
