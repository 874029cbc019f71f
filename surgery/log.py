"""Console output: verbosity and progress bars, set once by the CLI."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("surgery")
_quiet = False


def launch_rank() -> int:
    """This process's rank under ``torchrun`` (``RANK``), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def rank_prefix() -> str:
    """``"rank R of N: "`` under a multi-process ``torchrun`` launch, else ``""`` (for error messages)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"rank {launch_rank()} of {world}: " if world not in ("", "1") else ""


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

    Under ``torchrun`` only rank 0 shows progress and info; other ranks' warnings name their rank.
    """
    global _quiet
    _quiet = quiet
    quiet = quiet or launch_rank() != 0
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = _StderrHandler()
    prefix = rank_prefix() if launch_rank() != 0 else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
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
    """True when progress bars and info messages are off (always on ranks other than 0)."""
    return _quiet or launch_rank() != 0


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> Iterator[T] | Any:
    """A tqdm progress bar on stderr, disabled in quiet mode or when stderr is not a terminal-like stream."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", quiet())
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
