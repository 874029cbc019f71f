"""Dtype names as config.json and safetensors headers spell them, to and from ``torch.dtype``."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StudentError

# safetensors header dtype names -> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any, where: str) -> torch.dtype:
    value = getattr(torch, str(name), None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise StudentError(f"{where}: {name!r} is not a torch dtype (e.g. 'float32', 'bfloat16'); restore config.json")
    return value
