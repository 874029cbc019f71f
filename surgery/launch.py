"""``surgery apply --nproc N``: the same command under ``torchrun`` on N local processes.

A convenience for one machine: it checks what it can before any process starts (the recipe,
the output paths, that every stage's micro-batches split over N ranks; problems exit with
code 2) and then runs ``python -m torch.distributed.run --standalone --nproc-per-node N -m
surgery ARGS`` with the remaining arguments. Multi-node launches use ``torchrun`` directly.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from .errors import SurgeryError
from .options import ApplyOptions
from .recipe import Recipe


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--nproc N`` / ``--nproc=N`` taken out."""
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--nproc":
            skip = True
        elif not word.startswith("--nproc="):
            out.append(word)
    return out


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The torchrun command line that runs ``surgery ARGV`` (without ``--nproc``) on ``nproc`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "surgery", *without_nproc(argv)]


def launch(argv: Sequence[str], nproc: int, recipe: Recipe, options: ApplyOptions) -> int:
    """Pre-flight checks, then torchrun; returns its exit code (1 when a rank failed; its message names the rank)."""
    from verify.compiled import check_compile
    from verify.runner import check_split

    from .distributed import launched_by_torchrun
    from .pipeline import Run

    if nproc < 1:
        raise SurgeryError(f"--nproc {nproc}: give the number of processes, at least 1")
    if launched_by_torchrun():
        raise SurgeryError("--nproc starts torchrun, but this process already runs under torchrun; drop --nproc")
    Run(recipe, options).check_paths()
    check_split(recipe, nproc)
    check_compile(recipe, nproc)
    return subprocess.call(torchrun_command(argv, nproc))
