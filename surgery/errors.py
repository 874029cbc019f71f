"""User-facing errors.

Anything a user can fix (a bad recipe, a selector that matches nothing, a
missing teacher) raises a :class:`SurgeryError`. The CLI prints its message
without a traceback and exits with :attr:`SurgeryError.exit_code` (2), before
anything is written.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SurgeryError(Exception):
    """An error the user can fix; the message says what is wrong and how to fix it."""

    exit_code: int = 2


class RecipeError(SurgeryError):
    """The recipe (file, overrides or Python object) is invalid."""


class SelectionError(SurgeryError):
    """A replace rule's selector is malformed or matches nothing."""


class TeacherError(SurgeryError):
    """The teacher reference cannot be resolved or loaded."""


class DataError(SurgeryError):
    """A data source cannot be read or yields too few tokens."""


class StudentError(SurgeryError):
    """A student directory is missing, incomplete or tampered with."""


class TrainingError(SurgeryError):
    """Training stopped (non-finite loss, interrupted state that cannot resume)."""


def suggest(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidates, or ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
