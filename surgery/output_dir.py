"""Where a run writes: the output directory checked before any work starts (nothing is written).

``surgery apply`` writes ``OUT.partial/`` beside ``OUT`` while it runs and renames a finished
temporary directory to ``OUT`` at the end, so ``OUT`` must name a new directory (not ``/``,
``.`` or ``''``) in a place where directories can be created. :func:`check_output_dir` finds
out in milliseconds, instead of after the teacher is loaded and the data tokenized.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import SurgeryError


def output_name_problem(text: str) -> str | None:
    """Why ``text`` cannot name an output directory, or None."""
    if not text.strip():
        return "the output directory is empty; give a directory such as runs/NAME"
    if Path(text).name in ("", ".", ".."):
        return f"{text!r} names no new directory (the root, '.' or '..'); give a directory such as runs/NAME"
    return None


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``lexists``: a dangling link counts)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_output_dir(out: str | Path) -> None:
    """Raise a :class:`SurgeryError` unless ``out`` names a directory this process can create.

    Probes the closest existing ancestor of ``out``'s parent by creating and removing one empty
    temporary directory there (read-only mounts, ``/proc``, missing permissions all show up).
    """
    problem = output_name_problem(str(out))
    if problem:
        raise SurgeryError(problem)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SurgeryError(f"output {out} exists and is not a directory; choose another --out or remove it")
    parent = _nearest_existing(out.absolute().parent)
    if not parent.is_dir():
        raise SurgeryError(f"{parent} is a file, so the output directory {out} cannot be created under it; "
                           "choose another --out")
    try:
        probe = tempfile.mkdtemp(prefix=".surgery-probe-", dir=parent)
    except OSError as err:
        why = os.strerror(err.errno) if err.errno else str(err)
        hint = " (the disk is full)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise SurgeryError(f"cannot create the output directory {out}: {parent} is not writable here "
                           f"({why}){hint}; choose --out in a writable directory") from None
    os.rmdir(probe)


__all__ = ["check_output_dir", "output_name_problem"]
