"""``config.json``: the teacher family's config plus the ``surgery`` section; written from a student, read back and checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import StudentError
from .auto_class import AUTO_MAP
from .dtypes import dtype_from_name, dtype_name
from .layout import CONFIG, FORMAT_VERSION

FIX_CONFIG = "restore config.json from the original output directory (or re-run surgery apply)"


def read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(family config dict, surgery section), validated."""
    if not path.exists():
        raise StudentError(f"student directory {path} does not exist; give the directory written by surgery apply / surgery.save")
    if not path.is_dir():
        raise StudentError(f"{path} is a file; give the student directory (it holds config.json and model.safetensors)")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise StudentError(f"{path} has no {CONFIG}; it is not a complete student directory: {FIX_CONFIG}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StudentError(f"{cfg_path} is not valid JSON ({err}); {FIX_CONFIG}") from None
    if not isinstance(config, dict):
        raise StudentError(f"{cfg_path} is not a JSON object; {FIX_CONFIG}")
    section = config.pop("surgery", None)
    if section is None:
        raise StudentError(
            f"{cfg_path} has no 'surgery' section, so {path} is not a surgery student. A plain Hugging Face model "
            "loads with transformers.AutoModelForCausalLM.from_pretrained (surgery eval / generate take it as a "
            f"teacher reference); for a student, {FIX_CONFIG}"
        )
    _check_section(section, cfg_path)
    if not isinstance(config.get("model_type"), str):
        raise StudentError(f"{cfg_path} has no model_type; {FIX_CONFIG}")
    return config, section


def _check_section(section: Any, cfg_path: Path) -> None:
    where = f"{cfg_path}: surgery"
    if not isinstance(section, dict):
        raise StudentError(f"{where} must be an object with version and nodes, got {type(section).__name__}; {FIX_CONFIG}")
    version = section.get("version")
    if not isinstance(version, int):
        raise StudentError(f"{where}.version is missing or not an integer; {FIX_CONFIG}")
    if version > FORMAT_VERSION:
        raise StudentError(f"{where}.version is {version}, newer than this surgery ({__version__}) reads "
                           f"(up to {FORMAT_VERSION}); upgrade surgery")
    nodes = section.get("nodes")
    if not isinstance(nodes, list):
        raise StudentError(f"{where}.nodes is missing or not a list; {FIX_CONFIG}")
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise StudentError(f"{where}.nodes[{i}] is not an object; {FIX_CONFIG}")
        for key, types in (("path", str), ("layer", int), ("rule", str)):
            if not isinstance(node.get(key), types):
                raise StudentError(f"{where}.nodes[{i}].{key} is missing or not a {types.__name__}; {FIX_CONFIG}")
        if node.get("mixer") is not None and not isinstance(node["mixer"], str):
            raise StudentError(f"{where}.nodes[{i}].mixer must be a mixer name or null; {FIX_CONFIG}")
        if not isinstance(node.get("params", {}), dict):
            raise StudentError(f"{where}.nodes[{i}].params must be an object; {FIX_CONFIG}")
    for key in ("dtypes", "tied"):
        if not isinstance(section.get(key, {}), dict):
            raise StudentError(f"{where}.{key} must be an object; {FIX_CONFIG}")



def section_dtype(section: dict[str, Any], path: Path) -> torch.dtype:
    """The dtype most tensors are stored in, as ``surgery.dtype`` records it."""
    return dtype_from_name(section.get("dtype", "float32"), f"{path / CONFIG}: surgery.dtype")


def student_config(
    student: nn.Module, *, base: type, teacher_ref: str | None, nodes: list[dict[str, Any]], plan: Any,
    main_dtype: torch.dtype, other_dtypes: dict[str, str], aliases: dict[str, str],
) -> dict[str, Any]:
    """What ``config.json`` holds: the family's config + the surgery section."""
    config = student.config.to_dict()
    config.pop("surgery", None)  # a reloaded student's stale copy; rewritten below
    config["architectures"] = [base.__name__]
    config["dtype"] = dtype_name(main_dtype)
    config.pop("torch_dtype", None)
    config["auto_map"] = dict(AUTO_MAP)  # AutoModelForCausalLM(..., trust_remote_code=True) -> surgery.load
    config["surgery"] = {
        "version": FORMAT_VERSION,
        "surgery_version": __version__,
        "teacher": teacher_ref,
        "family": student.config.model_type,
        "architecture": base.__name__,
        "attn_implementation": getattr(student.config, "_attn_implementation", None),
        "dtype": dtype_name(main_dtype),
        "dtypes": other_dtypes,  # tensors stored in another dtype than `dtype`
        "tied": aliases,  # {alias: stored name}: stored once
        "nodes": nodes,
        "rules": plan.rules if plan is not None else None,
        "summary": plan.summary() if plan is not None else {"replaced": sum(bool(n["mixer"]) for n in nodes)},
    }
    return config
