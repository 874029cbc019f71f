"""Checking a student directory against itself: config.json, the weight headers and the model they describe.

:func:`validate` makes every check :func:`~surgery.student.load` makes, on the meta device
(no tensor data read); both start with :func:`read_student` and end in :func:`check_tensors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import StudentError
from ..io import sha256_file as sha256
from .build import build_model
from .config import read_config, section_dtype
from .dtypes import dtype_from_name, dtype_name
from .layout import PROVENANCE
from .nodes import node_of
from .sizes import check_layer_count
from .tensors import named_tensors, tied_aliases
from .tokenizer import load_tokenizer
from .weights import read_headers, weight_files

Headers = dict[str, tuple[str, tuple[int, ...], torch.dtype]]  # tensor name -> (file, shape, dtype)


@dataclass
class StudentInfo:
    """What :func:`validate` found in a student directory."""

    path: Path
    config: dict[str, Any]  # config.json without the surgery section
    section: dict[str, Any]  # the surgery section
    files: list[str]  # weight files
    tensors: Headers = field(default_factory=dict)  # name -> (file, shape, dtype)
    tokenizer: bool | None = None  # whether a tokenizer loads (None: not checked)

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.section["nodes"]

    @property
    def dtype(self) -> torch.dtype:
        return section_dtype(self.section, self.path)

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "family": self.config.get("model_type"),
            "teacher": self.section.get("teacher"),
            "replaced": sum(bool(n.get("mixer")) for n in self.nodes),
            "nodes": len(self.nodes),
            "dtype": dtype_name(self.dtype),
            "files": self.files,
            "tensors": len(self.tensors),
            "tokenizer": self.tokenizer,
        }


def read_student(path: Path) -> tuple[dict[str, Any], dict[str, Any], list[str], Headers, torch.dtype]:
    """(config without the section, surgery section, weight files, their headers, saved dtype), each checked."""
    config, section = read_config(path)
    files, weight_map = weight_files(path)
    found = read_headers(path, files, weight_map)
    check_layer_count(config, found, path)  # before anything is built from config.json
    return config, section, files, found, section_dtype(section, path)


def check_tensors(
    path: Path, model: nn.Module, found: Headers, section: dict[str, Any]
) -> list[tuple[str, torch.Tensor, torch.dtype]]:
    """Compare the file headers with the model built from config.json; returns (name, target, dtype) to load."""
    expected = named_tensors(model)
    aliases = tied_aliases(model)
    others = section.get("dtypes", {})
    main = section_dtype(section, path)
    nodes = section["nodes"]
    missing, shapes, dtypes, plan = [], [], [], []
    for name, target in expected:
        if name not in found:
            missing.append(name)
            continue
        f, shape, dtype = found[name]
        want_dtype = dtype_from_name(others[name], f"surgery.dtypes[{name}]") if name in others else (
            main if target.is_floating_point() else target.dtype)
        if shape != tuple(target.shape):
            shapes.append((name, f, shape, tuple(target.shape)))
        elif dtype != want_dtype:
            dtypes.append((name, f, dtype, want_dtype))
        plan.append((name, target, want_dtype))
    names = {n for n, _ in expected}
    unexpected = sorted(set(found) - names)
    problems = []
    if shapes:
        name, f, got, want = shapes[0]
        node = node_of(name, nodes)
        where = (f"node {node['path']} ({node['mixer']}, params {node.get('params')}) builds {name} with shape "
                 f"{list(want)}" if node else f"the {section.get('architecture') or 'model'} built from config.json "
                 f"expects {list(want)}")
        more = f" (and {len(shapes) - 1} more tensors)" if len(shapes) > 1 else ""
        problems.append(f"tensor {name} in {f} has shape {list(got)}, but {where}{more}: config.json no longer fits "
                        "the saved weights (were its params or sizes edited?)")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        problems.append(f"tensor {missing[0]}{more} missing from the weight files")
    if unexpected:
        name = unexpected[0]
        tied = f" (in this architecture it is tied to {aliases[name]}, stored once)" if name in aliases else ""
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        problems.append(f"unexpected tensor {name}{tied}{more} in {found[name][0]}: the model built from config.json "
                        "has no such parameter")
    if dtypes:
        name, f, got, want = dtypes[0]
        problems.append(f"tensor {name} in {f} is {dtype_name(got)}, but config.json records {dtype_name(want)}")
    if problems:
        raise StudentError(
            f"the weights in {path} do not match its config.json: " + "; ".join(problems)
            + ". If config.json was edited, restore it; otherwise the weight files are incomplete or from another "
            "run: copy the directory again or re-run surgery apply"
        )
    return plan


def validate(path: str | Path, *, tokenizer: bool = True, checksums: bool = False) -> StudentInfo:
    """Every check :func:`load` makes, without loading weights (the model is built on the meta device).

    ``tokenizer``: also check that the tokenizer loads. ``checksums``: also compare each weight
    file's sha256 with ``provenance.json``. Raises :class:`StudentError`; returns a :class:`StudentInfo`.
    """
    path = Path(path)
    config, section, files, found, dtype = read_student(path)
    model = build_model(config, section, path, torch.device("meta"), dtype)
    check_tensors(path, model, found, section)
    info = StudentInfo(path, config, section, files, found)
    if checksums:
        _check_checksums(path, files)
    if tokenizer:
        load_tokenizer(path)
        info.tokenizer = True
    return info


def _check_checksums(path: Path, files: list[str]) -> None:
    try:
        recorded = json.loads((path / PROVENANCE).read_text(encoding="utf-8")).get("weights_sha256") or {}
    except (OSError, ValueError):
        raise StudentError(f"{path / PROVENANCE} is missing or unreadable; checksums cannot be checked") from None
    for f in files:
        if f.endswith(".safetensors") and f in recorded and sha256(path / f) != recorded[f]:
            raise StudentError(f"{path / f} differs from the file that was saved (sha256 mismatch with provenance.json); "
                               "copy it again from the original output")

