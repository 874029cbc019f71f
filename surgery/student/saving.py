"""Saving a student: every file of the directory (see :mod:`surgery.student.layout`), checked before it is published."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import StudentError
from ..io import sha256_file as sha256
from .auto_class import write_auto_code
from .card import model_card
from .config import student_config
from .layout import (
    CARD,
    CONFIG,
    DEFAULT_SHARD_SIZE,
    GENERATION_CONFIG,
    PROVENANCE,
    RECIPE,
    REPORT,
    REPORT_MD,
    write_json,
)
from .nodes import base_class, check_nodes_match, student_nodes
from .provenance import build_provenance, teacher_license
from .tensors import main_dtype, named_tensors, tied_aliases
from .validation import validate
from .weights import parse_size, write_weights

log = logging.getLogger("surgery")


def save_student(
    directory: str | Path,
    student: nn.Module,
    *,
    tokenizer: Any,
    plan: Any,
    recipe: Any,
    teacher: Any,
    report: dict | None,
    report_md: str | None,
    shard_size: str | int | None = None,
) -> None:
    """Write the student into the existing (temporary) ``directory``; :mod:`surgery.student.layout` lists the files.

    ``plan`` (a :class:`~surgery.rewriter.Plan`) or None (nodes read off the module tree);
    ``recipe``, ``teacher`` (:class:`~surgery.teacher.Teacher`), ``report``, ``report_md`` may be None.
    ``shard_size`` defaults to ``recipe.output.shard_size`` (else 2GB). Checks the written
    directory with :func:`validate` before returning, so a directory that would not load is never published.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StudentError(f"{directory} is not a directory; save_student writes into an existing (temporary) directory")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)  # a temporary directory is private (0700); a model directory is not
    nodes = plan.nodes() if plan is not None else student_nodes(student)
    if plan is not None:
        check_nodes_match(student, nodes)
    base = base_class(student)
    tensors = named_tensors(student)
    main, other_dtypes = main_dtype(tensors)
    teacher_ref = getattr(teacher, "ref", None) or (recipe.teacher.model if recipe is not None else None)
    family = student.config.model_type

    write_json(directory / CONFIG, student_config(student, base=base, teacher_ref=teacher_ref, nodes=nodes, plan=plan,
                                                  main_dtype=main, other_dtypes=other_dtypes,
                                                  aliases=tied_aliases(student)))
    write_auto_code(directory)
    limit = parse_size(shard_size or (recipe.output.shard_size if recipe is not None else DEFAULT_SHARD_SIZE))
    files = write_weights(directory, tensors, limit)
    for f in files:
        os.chmod(directory / f, 0o666 & ~umask)
    gen = getattr(student, "generation_config", None)
    if gen is not None:
        gen.to_json_file(str(directory / GENERATION_CONFIG), use_diff=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    else:
        log.warning("saving the student without a tokenizer: generate and eval need one; copy the teacher's "
                    "tokenizer files into %s", directory)
    if recipe is not None:
        (directory / RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")
    if report is not None:
        write_json(directory / REPORT, report)
    if report_md is not None:
        (directory / REPORT_MD).write_text(report_md, encoding="utf-8")
    provenance = build_provenance(recipe=recipe, teacher=teacher, report=report,
                                  weight_files={f: sha256(directory / f) for f in files if f.endswith(".safetensors")})
    write_json(directory / PROVENANCE, provenance)
    name = (getattr(recipe, "name", None) if recipe is not None else None) or f"{family}-surgery-student"
    card = model_card(name=name, nodes=nodes, plan=plan, recipe=recipe, teacher_ref=teacher_ref, report=report,
                      license_=teacher_license(teacher), family=family, architecture=base.__name__,
                      base_model=teacher.source if getattr(teacher, "details", {}).get("kind") == "hub" else None)
    (directory / CARD).write_text(card, encoding="utf-8")
    validate(directory, tokenizer=tokenizer is not None)


def save(
    student: nn.Module,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    plan: Any = None,
    teacher: Any = None,
    recipe: Any = None,
    report: dict | None = None,
    report_md: str | None = None,
    shard_size: str | int | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a student (e.g. from :func:`surgery.rewrite`) as a loadable directory, atomically; returns the path.

    No recipe needed: ``surgery.save(student, "out", tokenizer=teacher.tokenizer, plan=plan)``.
    Without ``plan`` the replaced nodes are read off the module tree.
    """
    from ..errors import SurgeryError
    from ..io import atomic_dir
    from .prebuild import check_adapter_is_findable

    directory = Path(directory)
    try:
        check_adapter_is_findable(student)
    except SurgeryError as err:  # this process can still load it; say why another one could not
        log.warning("%s", str(err).replace("; nothing was trained or written", ""))
    try:
        with atomic_dir(directory, overwrite=overwrite) as tmp:
            save_student(tmp, student, tokenizer=tokenizer, plan=plan, recipe=recipe, teacher=teacher, report=report,
                         report_md=report_md, shard_size=shard_size)
    except FileExistsError:
        raise StudentError(f"{directory} already exists; pass overwrite=True or choose another directory") from None
    return directory
