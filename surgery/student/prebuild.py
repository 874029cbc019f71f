"""Before training: the student must rebuild from the ``config.json`` it will be saved with.

``surgery.load`` rebuilds a student from its config (the family's model, mixers spliced in by
each node's adapter and mixer) and checks every tensor against the weight files. Anything that
makes that fail -- a family without an adapter once its first layer is a mixer, a mixer whose
params do not round-trip, a tensor the rebuilt model names or shapes differently -- is known as
soon as the student exists. :func:`check_rebuildable` runs the same build on the ``meta``
device (no weights read or written, well under a second for the tiny models) and compares
tensor names and shapes with the student's, so that ``surgery plan`` and the start of
``surgery apply`` refuse what would otherwise fail after every stage has trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import StudentError, SurgeryError
from .build import build_model
from .config import student_config
from .nodes import base_class, check_nodes_match, student_nodes
from .tensors import main_dtype, named_tensors, tied_aliases
from .validation import check_tensors

FIX_BEFORE = "nothing was trained or written"


def saved_config(student: nn.Module, plan: Any) -> tuple[dict[str, Any], dict[str, Any], torch.dtype]:
    """(family config, surgery section, main dtype) as :func:`~surgery.student.save_student` would write them."""
    nodes = plan.nodes() if plan is not None else student_nodes(student)
    if plan is not None:
        check_nodes_match(student, nodes)
    tensors = named_tensors(student)
    main, others = main_dtype(tensors)
    config = student_config(student, base=base_class(student), teacher_ref=None, nodes=nodes, plan=plan,
                            main_dtype=main, other_dtypes=others, aliases=tied_aliases(student))
    config = json.loads(json.dumps(config, default=str))  # exactly what a reader of config.json gets
    section = config.pop("surgery")
    return config, section, main


def check_adapter_is_findable(student: nn.Module) -> None:
    """The family's adapter must be one a fresh process finds (built in, or a ``surgery.adapters`` entry point)."""
    from rewrites.adapters import ENTRY_POINT_GROUP, get_adapter
    from rewrites.adapters.base import loads_in_fresh_process

    adapter = type(get_adapter(student))
    if not loads_in_fresh_process(adapter):
        family = getattr(student.config, "model_type", "?")
        raise SurgeryError(
            f"the attention adapter for {family!r} ({adapter.__module__}.{adapter.__qualname__}) was registered by "
            "code this process ran, so surgery.load in another process would not find it and could not rebuild "
            f"the student; put it in an installed package and declare its module under the entry point group "
            f"{ENTRY_POINT_GROUP!r} (README, 'Adding a family'); nothing was trained or written"
        )


def check_rebuildable(student: nn.Module, plan: Any, out: str | Path) -> None:
    """Raise :class:`~surgery.errors.SurgeryError` (exit 2) if the saved student could not be rebuilt and loaded.

    ``out``: the output directory the student would be written to (named in the message).
    """
    out = Path(out)
    family = getattr(student.config, "model_type", "?")
    check_adapter_is_findable(student)
    try:
        config, section, main = saved_config(student, plan)
        model = build_model(config, section, out, torch.device("meta"), main, fix=FIX_BEFORE)
        found = {name: ("(the student in memory)", tuple(t.shape), t.dtype) for name, t in named_tensors(student)}
        check_tensors(out, model, found, section)
    except StudentError as err:
        raise SurgeryError(
            f"the {family} student this recipe builds could not be loaded back from the config.json it would be "
            f"saved with, so surgery apply would fail after training: {err}"
        ) from None
