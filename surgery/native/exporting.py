"""``export``: a student directory -> a native checkpoint of one transformers architecture, checked, atomically.

Order: the arguments are checked, the student is loaded (:func:`surgery.load`'s checks), the
target lists every mismatch (any -> :class:`ExportError`, nothing written), then into a temporary
directory beside the output: ``config.json`` (the target's ``model_type``, no ``auto_map``), the
weights (safetensors, sharded above 2GB), ``generation_config.json``, the tokenizer, the report
files, ``surgery_provenance.json`` and ``README.md``; plain transformers loads that directory and
must compute the student (:func:`~surgery.native.exactness.check_exact`) before it is renamed
into place. ``provenance.json`` and ``recipe.resolved.yaml`` would mark the directory as a surgery
student (:func:`surgery.student.is_student_dir`), so the export carries them as
``surgery_provenance.json`` (under ``"student"``) and ``surgery_recipe.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_dir, sha256_file
from ..student.layout import (
    CARD,
    DEFAULT_SHARD_SIZE,
    GENERATION_CONFIG,
    PROVENANCE,
    RECIPE,
    REPORT,
    REPORT_MD,
    TOKENIZER_FILES,
    write_json,
)
from ..student.provenance import build_provenance
from ..student.weights import parse_size, weight_files, write_weights
from .card import export_card
from .exactness import Exactness, check_exact
from .source import Student, read_student_dir
from .target import ExportError, Target, get_target

log = logging.getLogger("surgery")

EXPORT_PROVENANCE = "surgery_provenance.json"
EXPORT_RECIPE = "surgery_recipe.yaml"
CARRIED = {REPORT: REPORT, REPORT_MD: REPORT_MD, RECIPE: EXPORT_RECIPE}  # student file -> exported name
RUN_FIELDS = ("surgery_version", "created_utc", "command", "cwd", "git", "python", "platform", "packages")


def _check_paths(source: Path, output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists; pass --overwrite (overwrite=True) or choose another directory")
    src, out = source.resolve(), output.resolve()
    if out == src or out in src.parents:
        raise ExportError(f"the output {output} would replace the student {source}; choose another directory")


def _float32_student(student: Student) -> torch.nn.Module:
    """The student in float32 for the check (the loaded model itself when it is float32 throughout)."""
    if all(t.dtype == torch.float32 for t in student.model.state_dict().values() if t.is_floating_point()):
        return student.model
    from ..student import load

    return load(student.path, dtype=torch.float32)


def _provenance(student: Student, target: Target, config: dict[str, Any], files: list[str], exactness: Exactness,
                directory: Path) -> dict[str, Any]:
    run = build_provenance(recipe=None, teacher=None, report=None, weight_files={})
    source_files, _ = weight_files(student.path)
    student_prov = student.path / PROVENANCE
    return {
        "kind": "native_export",
        **{k: run[k] for k in RUN_FIELDS},
        "target": target.name,
        "architecture": target.architecture,
        "model_type": target.model_type,
        "min_transformers": target.min_transformers(student),
        "layers": {"mamba": sorted(student.mixers), "attention": student.attention_layers,
                   "identity_attention": target.identity_layers(student)},
        "check": exactness.to_dict(),
        "notes": target.notes(student),
        "source": {"path": str(student.path.resolve()),
                   "weights_sha256": {f: sha256_file(student.path / f) for f in source_files if f.endswith(".safetensors")}},
        "weights_sha256": {f: sha256_file(directory / f) for f in files if f.endswith(".safetensors")},
        "student": json.loads(student_prov.read_text(encoding="utf-8")) if student_prov.is_file() else None,
    }


def _write(directory: Path, student: Student, target: Target) -> None:
    """Every file of the export into ``directory`` (see the module docstring), checked last."""
    from transformers import AutoConfig

    kwargs = target.config(student)
    config = AutoConfig.for_model(target.model_type, **kwargs)
    config.architectures = [target.architecture]
    config.save_pretrained(str(directory))
    tensors = target.tensors(student, config)
    files = write_weights(directory, list(tensors.items()), parse_size(DEFAULT_SHARD_SIZE))
    del tensors
    if (student.path / GENERATION_CONFIG).is_file():
        shutil.copyfile(student.path / GENERATION_CONFIG, directory / GENERATION_CONFIG)
    if any((student.path / f).is_file() for f in TOKENIZER_FILES):
        from ..student import load_tokenizer

        load_tokenizer(student.path).save_pretrained(str(directory))
    else:
        log.warning("%s has no tokenizer: the export has none either; copy the teacher's tokenizer files into it",
                    student.path)
    for name, carried in CARRIED.items():
        if (student.path / name).is_file():
            shutil.copyfile(student.path / name, directory / carried)
    exactness = check_exact(directory, _float32_student(student))
    write_json(directory / EXPORT_PROVENANCE, _provenance(student, target, kwargs, files, exactness, directory))
    card = student.path / CARD
    (directory / CARD).write_text(export_card(
        student_card=card.read_text(encoding="utf-8") if card.is_file() else None, name=student.path.resolve().name,
        target=target.name, architecture=target.architecture, config=kwargs, identity=target.identity_layers(student),
        exactness=exactness,
        min_transformers=target.min_transformers(student), notes=target.notes(student),
    ), encoding="utf-8")


def export(student_dir: str | Path, output: str | Path | None, *, to: str = "bamba", overwrite: bool = False) -> Path:
    """Export a student directory to a native checkpoint of ``to`` (:data:`~surgery.native.target.TARGETS`).

    ``surgery.export("runs/smollm2-hybrid", "runs/smollm2-hybrid-bamba", to="bamba")`` writes a directory
    that ``transformers.AutoModelForCausalLM.from_pretrained`` loads without surgery or remote code, and
    returns its path. Raises :class:`ExportError` naming every mismatch when the target cannot express
    the student exactly, before anything is written; the written model is checked against the student.
    """
    if output is None:
        raise ExportError("no output directory: give one, e.g. surgery export STUDENT_DIR --to bamba -o OUT")
    source, output = Path(student_dir), Path(output)
    target = get_target(to)
    _check_paths(source, output, overwrite)
    student = read_student_dir(source)
    problems = target.mismatches(student)
    if problems:
        raise ExportError(f"{source} cannot be expressed exactly as {target.architecture} (--to {target.name}); "
                          "nothing was written:\n  " + "\n  ".join(problems))
    for note in target.notes(student):
        log.warning("%s", note)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a temporary directory is private (0700); a model directory is not
        _write(tmp, student, target)
    log.info("exported %s to %s (%s)", source, output, target.architecture)
    return output
