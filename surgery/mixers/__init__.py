"""Registry of SSM mixers by name (``discrete_mamba2``, ``mamba2``, and the structured families of
MOHAWK's ablation: ``toeplitz``, ``low_rank``, ``semiseparable``).

A mixer module registers itself with :func:`register_mixer`; rewrite rules
(``rewrites/``) look mixers up with :func:`get_mixer`. Importing this package
imports the built-in mixers, so the registry is complete after ``import
surgery.mixers``. Nothing here imports triton or mamba_ssm.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import suggest
from .base import AttentionShape, AttentionWeights, Mixer, MixerInit, MixerParams

MIXERS: dict[str, type[Mixer]] = {}


def register_mixer(name: str) -> Callable[[type[Mixer]], type[Mixer]]:
    """Class decorator: register a :class:`Mixer` subclass under ``name``."""

    def decorate(cls: type[Mixer]) -> type[Mixer]:
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(f"mixer {name!r} is registered twice")
        cls.name = name
        MIXERS[name] = cls
        return cls

    return decorate


def get_mixer(name: str) -> type[Mixer]:
    """The mixer class registered as ``name``; ``KeyError`` with suggestions otherwise."""
    if name not in MIXERS:
        raise KeyError(f"unknown mixer {name!r}{suggest(name, MIXERS)}; known: {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


def _import_builtins() -> None:
    import importlib

    for module in ("discrete_mamba2", "mamba2", "toeplitz", "low_rank", "semiseparable"):
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as err:  # a built-in mixer not written yet
            if err.name != f"{__name__}.{module}":
                raise


_import_builtins()

__all__ = [
    "MIXERS",
    "AttentionShape",
    "AttentionWeights",
    "Mixer",
    "MixerInit",
    "MixerParams",
    "get_mixer",
    "register_mixer",
]
