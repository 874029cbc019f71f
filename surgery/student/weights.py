"""The safetensors weight files: written whole or in shards with an index, found, opened and read back.

No tensor data is read here except by the caller through :func:`open_weights`; :func:`read_headers`
reads names, shapes and dtypes from the file headers only. Pickle weights are never opened, and
weight files must be regular files inside the directory (:func:`check_weight_file`: no folder,
device or link out of it).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import StudentError
from ..io import file_kind
from .dtypes import ST_DTYPES
from .layout import INDEX, PICKLE_WEIGHTS, WEIGHTS, write_json


def parse_size(text: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000 (decimal units K, M, G; a bare number is bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size {text!r} is not like '2GB', '500MB' or '10KB'")
    return int(float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2).upper()])


def _shards(tensors: list[tuple[str, torch.Tensor]], limit: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Greedy split in order; a tensor larger than ``limit`` gets a shard of its own."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    return shards


def write_weights(directory: Path, tensors: list[tuple[str, torch.Tensor]], shard_size: int) -> list[str]:
    """Write ``model.safetensors`` (or shards + index); returns the file names written."""
    from safetensors.torch import save_file

    metadata = {"format": "pt", "surgery_version": __version__}
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    # tensors sharing storage without being one object (safetensors refuses those) are written as copies
    storages: set[int] = set()

    def cpu(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        out = t.to("cpu").contiguous()
        if t.numel():
            key = t.untyped_storage().data_ptr()
            if key in storages:
                out = out.clone()
            storages.add(key)
        return out

    if total <= shard_size:
        save_file({name: cpu(t) for name, t in tensors}, str(directory / WEIGHTS), metadata=metadata)
        return [WEIGHTS]
    shards = _shards(tensors, shard_size)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file({k: cpu(t) for k, t in shard}, str(directory / name), metadata=metadata)
        weight_map.update({k: name for k, _ in shard})
    write_json(directory / INDEX, {"metadata": {"total_size": total, "format": "pt"}, "weight_map": weight_map})
    return [*names, INDEX]


def check_weight_file(path: Path, name: str) -> bool:
    """Whether weight file ``path/name`` exists; a StudentError when it is not a regular file inside ``path``."""
    full = path / name
    if not os.path.lexists(full):
        return False
    if full.is_symlink():
        target = full.resolve()
        if not target.is_relative_to(path.resolve()):
            raise StudentError(f"{full} is a link to {target}, outside the student directory; surgery does not "
                               "follow weight files out of it: copy the file itself into the directory")
    try:
        mode = full.stat().st_mode
    except OSError:
        raise StudentError(f"{full} is a broken link (to {os.readlink(full)}); copy the file itself into the "
                           "directory") from None
    if not stat.S_ISREG(mode):
        raise StudentError(f"{full} is {file_kind(mode)}, not a safetensors file; copy the file from the original "
                           "output or re-run surgery apply")
    return True


def weight_files(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """(weight files, index weight map or None)."""
    index_path = path / INDEX
    if check_weight_file(path, INDEX):
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError) as err:
            raise StudentError(f"{index_path} is malformed ({err}); copy it again from the original output") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if Path(f).name != f:
                raise StudentError(f"{index_path} lists {f!r}, which is not a file name in the directory; copy it again")
        missing = [f for f in files if not check_weight_file(path, f)]
        if missing:
            raise StudentError(
                f"{path} is incomplete: shard {missing[0]} listed in {INDEX} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; copy every model-*-of-*.safetensors file of the original output"
            )
        return files, weight_map
    if check_weight_file(path, WEIGHTS):
        return [WEIGHTS], None
    pickled = [p for p in PICKLE_WEIGHTS if (path / p).exists()]
    if pickled:
        raise StudentError(
            f"{path} holds only pickle weights ({pickled[0]}), which surgery never loads (pickle runs code); "
            "save the student with surgery.save to get model.safetensors"
        )
    shards = sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
    if shards:
        raise StudentError(f"{path} has weight shards ({shards[0]}, ...) but no {INDEX}; copy the index file too")
    raise StudentError(f"{path} has no weights: {WEIGHTS} is missing; copy it from the original output or re-run surgery apply")


@contextmanager
def open_weights(path: Path, files: list[str], device: str) -> Iterator[dict[str, Any]]:
    """safe_open every weight file; corrupt or truncated files raise StudentError."""
    from safetensors import safe_open

    with ExitStack() as stack:
        handles = {}
        for f in files:
            try:
                handles[f] = stack.enter_context(safe_open(str(path / f), framework="pt", device=device))
            except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: same fix
                raise StudentError(
                    f"cannot read {path / f}: {str(err).strip() or type(err).__name__}; the file is corrupt or "
                    "truncated: copy it again from the original output or re-run surgery apply"
                ) from None
        yield handles


def read_headers(
    path: Path, files: list[str], weight_map: dict[str, str] | None
) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    """name -> (file, shape, dtype) from the safetensors headers (no tensor data read)."""
    found: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
    with open_weights(path, files, "cpu") as handles:
        for f, h in handles.items():
            for name in h.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                if name in found:
                    raise StudentError(f"tensor {name} is stored twice ({found[name][0]} and {f}); copy the directory again")
                sl = h.get_slice(name)
                dtype = ST_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise StudentError(f"{path / f}: tensor {name} has dtype {sl.get_dtype()}, which surgery cannot load")
                found[name] = (f, tuple(sl.get_shape()), dtype)
    if weight_map is not None:
        wrong = [(k, f) for k, f in weight_map.items() if k not in found or found[k][0] != f]
        if wrong:
            k, f = wrong[0]
            raise StudentError(f"{INDEX} says tensor {k} is in {f}, but it is not there; the shards and the index do "
                               "not belong together: copy them again from the original output")
        unlisted = sorted(set(found) - set(weight_map))
        if unlisted:
            raise StudentError(f"tensor {unlisted[0]} is in {found[unlisted[0]][0]} but not listed in {INDEX}; "
                               "copy the shards and the index again from the original output")
    return found
