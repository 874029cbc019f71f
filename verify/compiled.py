"""Decoder blocks compiled with ``torch.compile`` while a stage trains.

At 135M parameters a training step is many small kernels (norms, activations, casts, residual
adds around each matmul); inductor fuses the element-wise work of a block into a few kernels.
The fused Triton kernels (SSD, causal conv) stay opaque calls (``torch.compiler.disable``).
Blocks are compiled in place (``nn.Module.compile``) and restored on exit; one graph serves
every block of the same class and shapes (parameters are graph inputs). Modules that get
forward hooks per step (the teacher in stages 1-2, which records its calls) are not compiled:
new hooks would recompile every step.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgery.errors import RecipeError

if TYPE_CHECKING:
    from surgery.recipe import Recipe


@contextmanager
def compiled_blocks(model: nn.Module, paths: list[str], **options: Any) -> Iterator[list[nn.Module]]:
    """Within the block, the submodules of ``model`` at ``paths`` run compiled (``torch.compile`` options)."""
    modules = [model.get_submodule(p) for p in paths]
    for module in modules:
        module.compile(**{"dynamic": False, **options})  # shapes are fixed per stage; symbolic ones tripped inductor
    try:
        yield modules
    finally:
        for module in modules:
            module._compiled_call_impl = None  # back to eager (nn.Module.compile's own slot)
        torch._dynamo.reset()  # compiled graphs bake in kernel choices; the next use re-traces


def check_compile(recipe: Recipe, ranks: int, device: torch.device | None = None) -> None:
    """Before training: ``compile: true`` is for one process (under torchrun the blocks are wrapped for
    DDP / FSDP2, untested), and on a CPU inductor needs a C++ compiler for the kernels it generates."""
    for s in (2, 3):
        cfg = recipe.stage(s)
        if not (cfg.enabled and cfg.compile):
            continue
        if ranks > 1:
            raise RecipeError(f"stages.stage{s}.compile: true runs in one process only, not with {ranks} ranks; "
                              f"set stages.stage{s}.compile=false for torchrun")
        if device is not None and device.type == "cpu" and cpp_compiler() is None:
            raise RecipeError(f"stages.stage{s}.compile: torch.compile on the CPU builds C++ kernels and no C++ "
                              f"compiler was found (g++, or $CXX); install one (e.g. apt install g++) or set "
                              f"stages.stage{s}.compile=false")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on this machine, or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch that moved it: look on PATH as inductor would
        return next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)
    try:
        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 -- inductor's InvalidCxxCompiler, or a failing `--version`
        return None


@contextmanager
def stage_compiled(stage: int, teacher: nn.Module, student: nn.Module, blocks: list[str],
                   **options: Any) -> Iterator[None]:
    """Stage ``stage`` of a ``compile: true`` recipe: the student's converted ``blocks`` run compiled in
    stages 2 and 3, the teacher's in stage 3 (in stage 2 the teacher records its block inputs through hooks).
    ``options`` go to ``torch.compile`` (``bench/train.py``'s ``graphs`` path: ``mode="reduce-overhead"``)."""
    with ExitStack() as stack:
        if stage in (2, 3):
            stack.enter_context(compiled_blocks(student, blocks, **options))
        if stage == 3:
            stack.enter_context(compiled_blocks(teacher, blocks, **options))
        yield
