"""Rebuild a student's module tree from its config: the family's causal LM (no random init), mixers spliced in.

No weights are read here; on the meta device this is the structural check :func:`validate` makes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import StudentError, SurgeryError, suggest
from .config import FIX_CONFIG
from .layout import CONFIG
from .provenance import package_version

log = logging.getLogger("surgery")


def build_model(config: dict[str, Any], section: dict[str, Any], path: Path, device: torch.device, dtype: torch.dtype,
                fix: str = FIX_CONFIG) -> nn.Module:
    """The family's causal LM from the config (no random init) with the mixers spliced in.

    ``fix`` ends each error message: how to repair a saved directory (the default), or, for the check
    :func:`surgery.student.prebuild.check_rebuildable` makes before training, what to change instead.
    """
    from pydantic import ValidationError
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]

    from ..rewriter import splice

    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise StudentError(f"{path / CONFIG}: model_type {model_type!r} is not a family this transformers "
                           f"({package_version('transformers')}) knows{suggest(model_type, CONFIG_MAPPING.keys())}; "
                           "restore config.json, or install the transformers version recorded in provenance.json")
    try:
        hf_config = CONFIG_MAPPING[model_type].from_dict(dict(config))
    except Exception as err:  # noqa: BLE001 - any config error has the same fix
        raise StudentError(f"{path / CONFIG} is not a valid {model_type} config ({err}); {fix}") from None
    attn = section.get("attn_implementation")
    kwargs = {"attn_implementation": attn} if isinstance(attn, str) else {}
    try:
        with no_init_weights(), torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **kwargs)
            model.tie_weights()  # no_init_weights also skips the tying that init_weights would do
    except Exception as err:  # noqa: BLE001
        raise StudentError(f"cannot build a {model_type} model from {path / CONFIG} ({type(err).__name__}: {err}); "
                           f"{fix}") from None
    arch = section.get("architecture")
    if arch and type(model).__name__ != arch:
        log.warning("%s records architecture %s; built %s", path / CONFIG, arch, type(model).__name__)
    for i, node in enumerate(section["nodes"]):  # one node at a time, so an error names its node
        try:
            with no_init_weights():
                splice(model, [node])
        except (KeyError, SurgeryError, ValidationError, ValueError, TypeError) as err:
            text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            if isinstance(err, ValidationError):
                text = "; ".join(
                    (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
                    for e in err.errors(include_url=False)
                )
            text = text.replace("surgery.nodes[0]: ", "")
            raise StudentError(f"{path / CONFIG}: surgery.nodes[{i}] ({node.get('path')}) cannot be rebuilt: {text}; "
                               f"{fix}") from None
    return model
