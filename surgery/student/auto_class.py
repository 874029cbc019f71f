"""Loading a student through transformers' Auto classes (``trust_remote_code=True``).

A student directory's ``config.json`` keeps the teacher family's ``model_type`` (so the family's
config class reads it) and adds ``auto_map`` pointing ``AutoModelForCausalLM`` at a small file
written beside the weights, :data:`AUTO_CODE`, whose ``from_pretrained`` calls :func:`auto_load`,
which is :func:`surgery.load`. So tools that only know the Hugging Face API load a student as is::

    AutoModelForCausalLM.from_pretrained("runs/smollm2-mamba", trust_remote_code=True)
    lm_eval --model hf --model_args pretrained=runs/smollm2-mamba,trust_remote_code=True ...

The file holds no model code: it needs ``surgery`` installed, and transformers copies and imports
it only when the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import StudentError

AUTO_CODE = "modeling_surgery.py"
AUTO_CLASS = "SurgeryStudentForCausalLM"
AUTO_MAP = {"AutoModelForCausalLM": f"{AUTO_CODE.removesuffix('.py')}.{AUTO_CLASS}"}

# Passed by transformers' Auto classes and meaningless for a local student directory.
_IGNORED = frozenset({"config", "trust_remote_code", "_from_auto", "adapter_kwargs", "revision", "code_revision",
                      "cache_dir", "force_download", "local_files_only", "proxies", "token", "subfolder",
                      "low_cpu_mem_usage", "use_safetensors", "_commit_hash"})

AUTO_SOURCE = f'''"""Loads this surgery student with transformers' Auto classes; written by surgery, holds no model code.

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # the same as surgery.load(path)

Needs the `surgery` package installed. Without trust_remote_code=True, transformers would build the
teacher's attention layers (uninitialised) in place of the mixers: load with surgery.load instead.
"""

from surgery.student.auto_class import auto_load


class {AUTO_CLASS}:
    """Stands for the student in transformers' Auto mapping; from_pretrained returns the loaded model."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return auto_load(pretrained_model_name_or_path, *model_args, **kwargs)
'''


def write_auto_code(directory: Path) -> None:
    """Write :data:`AUTO_CODE` into the student ``directory``."""
    (directory / AUTO_CODE).write_text(AUTO_SOURCE, encoding="utf-8")


def _device(device_map: Any) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if isinstance(device_map, (str, torch.device)):
        return torch.device(device_map)
    if isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) == 1:  # {"": "cuda:0"}: all on one
        return _device(next(iter(device_map.values())))
    raise StudentError(f"device_map={device_map!r}: a surgery student loads onto one device; give 'cpu', 'cuda', "
                       "'cuda:N', 'auto', an int or {'': device}")


def auto_load(path: str | Path, *model_args: Any, **kwargs: Any) -> nn.Module:
    """``from_pretrained`` of the Auto-class shim: :func:`surgery.load` with the Hugging Face keyword names.

    Understands ``dtype`` / ``torch_dtype`` (``"auto"`` keeps the saved dtypes), ``device_map``
    (one device: ``"cpu"``, ``"cuda:N"``, ``"auto"``, an int, or a dict
    placing everything on one device, as lm-eval-harness passes ``{"": device}``) and ``attn_implementation``;
    hub and download keywords are ignored (the directory is local), as is any keyword left at None or
    False (callers such as lm-eval-harness pass ``quantization_config=None``); anything else is an error.
    """
    from .loading import load

    if model_args:
        raise StudentError(f"a surgery student takes no positional model arguments, got {len(model_args)}")
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    dtype = torch_dtype if dtype in (None, "auto") else dtype
    dtype = None if dtype == "auto" else dtype
    device = _device(kwargs.pop("device_map", None))
    attn = kwargs.pop("attn_implementation", None)
    unknown = sorted(k for k, v in kwargs.items() if k not in _IGNORED and v is not None and v is not False)
    if unknown:
        raise StudentError(f"from_pretrained of a surgery student does not support {', '.join(unknown)} "
                           "(it takes dtype, device_map and attn_implementation); load it with surgery.load")
    return load(path, device=device, dtype=dtype, attn_implementation=attn)
