"""One run at a time per work directory: an exclusive lock on ``OUT.partial/lock``.

``surgery apply`` holds :func:`hold_work_dir` from its first check to its last write. The lock
is an ``fcntl.flock`` on ``OUT.partial/lock``, which records the holder's pid, host, start time
and command line; a second run on the same output is refused with those. The kernel releases a
flock when its process dies, so the lock of a run that was killed (a stale lock: the recorded pid
is gone) is simply taken over. Where ``fcntl`` is missing (Windows) the record alone is used: a
live recorded pid on this host refuses the run.

A refused or failed run leaves nothing behind: a work directory it created holding only the
lock file is removed again.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SurgeryError
from .log import logger

LOCK = "lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_holder(work: Path) -> dict[str, Any]:
    """The record in ``work/lock`` (empty when missing or unreadable)."""
    try:
        record = json.loads((work / LOCK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (started {when}: {holder.get('command', '?')})"


def _in_use(work: Path, holder: dict[str, Any]) -> SurgeryError:
    return SurgeryError(
        f"{work} is in use by {_describe(holder)}: another run is writing this output. Wait for it to finish, "
        "choose another --out, or stop that process and then pass --resume"
    )


def _record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(["surgery", *sys.argv[1:]]) if sys.argv else "surgery"}


def _take_flock(work: Path) -> int:
    """An open descriptor of ``work/lock`` holding the flock; raises when another process holds it."""
    path = work / LOCK
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise SurgeryError(f"cannot open the lock file {path} ({err.strerror}); remove it and run again") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(work, read_holder(work)) from None
        try:  # a finishing run may have removed the directory between our open and our flock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            work.mkdir(parents=True, exist_ok=True)
        os.close(fd)
    raise SurgeryError(f"cannot lock {path}: it keeps being removed by another process; try again")


def _write_record(fd: int, record: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)


@contextmanager
def hold_work_dir(work: Path) -> Iterator[None]:
    """Hold the lock on ``work`` (created if needed) for the body; refuse when another run holds it."""
    if os.path.lexists(work) and not work.is_dir():
        raise SurgeryError(f"{work} exists and is not a directory; remove it or choose another --out")
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    fd, held = None, False
    try:
        previous = read_holder(work)
        if fcntl is not None:
            fd = _take_flock(work)
        elif previous.get("host") == socket.gethostname() and _pid_alive(int(previous.get("pid", -1))):
            raise _in_use(work, previous)
        held = True
        if previous and previous.get("pid") != os.getpid():
            logger.warning("taking over %s from %s, which is no longer running", work / LOCK, _describe(previous))
        if fd is not None:
            _write_record(fd, _record())
        else:
            (work / LOCK).write_text(json.dumps(_record()) + "\n", encoding="utf-8")
        yield
    except BaseException:
        # a refused run leaves nothing behind; a failed one removes a work directory holding only its lock
        left = {p.name for p in work.iterdir()} if work.is_dir() else None
        if left is not None and ((held and left <= {LOCK}) or (created and not left)):
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def clear_work_dir(work: Path) -> None:
    """Remove everything in ``work`` except the lock (a fresh start, the lock still held)."""
    if not work.is_dir():
        return
    for child in work.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


__all__ = ["LOCK", "clear_work_dir", "hold_work_dir", "read_holder"]
