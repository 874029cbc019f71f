"""Loading a student directory as a ``PreTrainedModel``: from the directory alone, no teacher, no network, no pickle.

``config.json`` -> the family's causal-LM class built without random initialisation
(``transformers.initialization.no_init_weights``: parameters are allocated but never filled with
random values, buffers such as rotary frequencies are computed as usual) ->
:func:`surgery.rewriter.splice` from ``surgery.nodes`` -> tensors streamed one by one from
safetensors into the parameters (strict: each expected tensor present once, with the recorded
shape and dtype, nothing extra; NaN or infinite values refused, naming the tensors) ->
``enable_recurrent_cache`` -> eval mode.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import StudentError
from .build import build_model
from .dtypes import dtype_from_name
from .layout import GENERATION_CONFIG
from .validation import check_tensors, read_student
from .weights import open_weights


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load a student directory as a ``PreTrainedModel`` (eval mode) on ``device``.

    ``dtype``: None keeps the saved dtypes; else the model is built in ``dtype`` and every floating
    tensor is cast while it is copied in (no second copy of the model). ``attn_implementation``
    (kept attention layers only): None uses the one recorded at save time.
    ``model.generate`` uses the recurrent :class:`~surgery.cache.SurgeryCache`. The tokenizer:
    :func:`load_tokenizer`. Raises :class:`StudentError` for a missing, incomplete or tampered directory.
    """
    from ..cache import enable_recurrent_cache

    path = Path(path)
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype, "dtype")
    config, section, files, found, saved_dtype = read_student(path)
    if attn_implementation is not None:
        section = {**section, "attn_implementation": attn_implementation}
    model = build_model(config, section, path, device, dtype or saved_dtype)
    to_load = check_tensors(path, model, found, section)
    targets = {name: (target, want) for name, target, want in to_load}
    nonfinite: list[str] = []
    with open_weights(path, files, "cpu") as handles, torch.no_grad():
        for h in handles.values():
            for name in h.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                target, want = targets[name]
                tensor = h.get_tensor(name)  # checked: shape, and dtype == want
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    nonfinite.append(name)
                final = dtype if dtype is not None and tensor.is_floating_point() else want
                if target.dtype != final:  # stored in another dtype than the rest (surgery.dtypes)
                    target.data = torch.empty_like(target, dtype=final)
                target.copy_(tensor)  # casts to the requested dtype
    if nonfinite:
        more = f" (and {len(nonfinite) - 3} more)" if len(nonfinite) > 3 else ""
        raise StudentError(f"{path}: tensor {', '.join(sorted(nonfinite)[:3])}{more} holds NaN or infinite values: "
                           "the weights are broken (a diverged run, or an edited file); re-run surgery apply, or "
                           "resume the run with a lower learning rate")
    gen_path = path / GENERATION_CONFIG
    if gen_path.is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        except Exception as err:  # noqa: BLE001
            raise StudentError(f"{gen_path} is unreadable ({err}); delete it to use the defaults, or copy it again") from None
    model.config.surgery = section  # config.to_dict() / save_pretrained keep the section
    model.config._name_or_path = str(path)
    model.name_or_path = str(path)
    enable_recurrent_cache(model)  # splice did it already; idempotent
    return model.eval()
