"""config.json's layer count checked against the weight headers, before any module is built.

Building the model that config.json describes is the slow part of a load: a layer count edited
to 100000 would allocate for minutes before the tensor check could say the weights hold four.
The headers name every stored tensor (``model.layers.3.mlp...``), so the layers they hold are
counted first; only a config that asks for more layers than any stack of the weights holds is
refused (fewer is reported by the tensor check as unexpected tensors, with its own message).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import StudentError
from .config import FIX_CONFIG
from .layout import CONFIG

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # in the order families name it
_LAYER = re.compile(r"^(.*?)\.(?:layers|h|layer|blocks)\.(\d+)\.")  # prefix, layer index


def stored_layers(names: list[str] | set[str] | dict[str, Any]) -> int:
    """The most distinct layer indices any one layer stack (``model.layers``, ``transformer.h``, ...) holds."""
    stacks: dict[str, set[int]] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            stacks.setdefault(m.group(1), set()).add(int(m.group(2)))
    return max((len(indices) for indices in stacks.values()), default=0)


def check_layer_count(config: dict[str, Any], found: dict[str, Any], path: Path) -> None:
    """Raise when config.json asks for more layers than the weight files hold."""
    key = next((k for k in LAYER_COUNT_KEYS if k in config), None)
    if key is None:
        return
    wanted, held = config[key], stored_layers(found)
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 0:
        raise StudentError(f"{path / CONFIG}: {key} is {wanted!r}, not a layer count; {FIX_CONFIG}")
    if held and wanted > held:
        raise StudentError(f"{path / CONFIG} says {key}: {wanted}, but the weight files hold {held} layers; "
                           f"{FIX_CONFIG}")


__all__ = ["LAYER_COUNT_KEYS", "check_layer_count", "stored_layers"]
