"""The transformers calling conventions surgery relies on: named here once, checked, never guessed.

transformers renames things between minor releases. 5.24 renamed the cache everywhere from
``past_key_values`` to ``cache`` (model and layer ``forward``, ``generate``'s model kwargs, the
output field), keeping the old keyword as a deprecated alias on model ``forward`` only; decoder
layers then hand the cache to attention as ``cache=``. A mixer that looks for the cache under the
old name alone runs as if there were none and generates wrong text without an error: that is
what this module exists to prevent. Every place that hands a cache over or looks for one goes
through it, and anything it does not recognise raises :class:`UnknownConventionError` naming
what it saw (a ``Cache`` under a new keyword or position, a model whose ``forward`` takes no
known cache keyword).

Tested with the transformers versions in ``constraints.txt`` and the oldest supported one (see
the README's "Dependencies"); CI also runs the cache tests against the newest release.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from transformers.cache_utils import Cache

__all__ = [
    "ATTENTION_CACHE_KEYWORDS",
    "MODEL_CACHE_KEYWORDS",
    "UnknownConventionError",
    "attention_call_cache",
    "cache_keyword",
    "output_cache",
]

# Keywords under which a decoder layer hands its cache to attention:
# ``cache`` (transformers >= 5.24), ``past_key_values`` (5.x before 5.24), ``layer_past`` (GPT-NeoX),
# ``past_key_value`` (older 4.x-style layers).
ATTENTION_CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past", "past_key_value")
# Keywords under which a model's ``forward`` / ``generate`` take the cache, newest first.
MODEL_CACHE_KEYWORDS = ("cache", "past_key_values")


class UnknownConventionError(TypeError):
    """transformers called (or was called) in a way surgery does not know; the message says what was seen."""


def _versions() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


def cache_keyword(fn: Callable[..., Any]) -> str:
    """The keyword under which ``fn`` (a model's ``forward``) takes its cache: ``cache`` or ``past_key_values``."""
    params = inspect.signature(fn).parameters
    for name in MODEL_CACHE_KEYWORDS:
        if name in params:
            return name
    raise UnknownConventionError(
        f"{getattr(fn, '__qualname__', fn)} takes none of the cache keywords {MODEL_CACHE_KEYWORDS} ({_versions()}); "
        "surgery cannot hand it a recurrent cache. Install a transformers version from the supported range "
        "(README, 'Dependencies') or report it"
    )


def output_cache(output: Any) -> Any:
    """The cache a model ``forward`` / ``generate`` returned (``output.cache`` from 5.24, ``past_key_values`` before)."""
    for name in MODEL_CACHE_KEYWORDS:
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


def attention_call_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The cache a decoder layer handed to its attention module (None when it handed none).

    ``args``: positional arguments after ``hidden_states``; ``kwargs``: keyword arguments. A
    :class:`~transformers.cache_utils.Cache` anywhere but under one of
    :data:`ATTENTION_CACHE_KEYWORDS`, two caches, or ``use_cache=True`` with no cache at all
    raise :class:`UnknownConventionError`: the layer is calling in a way surgery was not written
    for, and carrying on would drop the recurrent state.
    """
    found = [(k, kwargs[k]) for k in ATTENTION_CACHE_KEYWORDS if kwargs.get(k) is not None]  # not `or`: an empty Cache is falsy
    stray = [f"keyword {k!r}" for k, v in kwargs.items() if isinstance(v, Cache) and k not in ATTENTION_CACHE_KEYWORDS]
    stray += [f"positional argument {i + 1}" for i, v in enumerate(args) if isinstance(v, Cache)]
    if stray:
        raise UnknownConventionError(
            f"the decoder layer handed its attention a cache as {', '.join(stray)} ({_versions()}); SSM mixers read the "
            f"cache only as one of {ATTENTION_CACHE_KEYWORDS}, so the recurrent state would be lost. Install a "
            "transformers version from the supported range (README, 'Dependencies') or report it"
        )
    if len(found) > 1:
        raise UnknownConventionError(f"the decoder layer handed its attention two caches ({', '.join(k for k, _ in found)})")
    if not found and kwargs.get("use_cache") is True:
        raise UnknownConventionError(
            f"the decoder layer asked for caching (use_cache=True) but handed no cache under any of "
            f"{ATTENTION_CACHE_KEYWORDS} ({_versions()}); the recurrent state would be lost. Install a transformers "
            "version from the supported range (README, 'Dependencies') or report it"
        )
    return found[0][1] if found else None
