"""Console output: verbosity and progress bars, set once by the CLI."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("surgery")
_quiet = False


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when it writes (callers and tests may swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(quiet: bool = False, verbose: int = 0, libraries: bool = True) -> None:
    """Set verbosity: ``quiet`` hides progress bars and info; ``verbose`` adds debug output.

    ``libraries=False`` leaves transformers' logging (and the import of transformers) to a later
    :func:`quiet_libraries`: schema-only commands never load it.
    """
    global _quiet
    _quiet = quiet
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore", module=r"(transformers|gguf|accelerate|torch)\b")
    if libraries:
        quiet_libraries(verbose)


def quiet_libraries(verbose: int = 0) -> None:
    """Silence transformers' own info messages and progress bars unless ``verbose`` (imports transformers)."""
    if verbose:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def quiet() -> bool:
    """True when progress bars and info messages are off."""
    return _quiet


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> Iterator[T] | Any:
    """A tqdm progress bar on stderr, disabled in quiet mode or when stderr is not a terminal-like stream."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", _quiet)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
