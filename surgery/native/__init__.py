"""Native export: a student as a checkpoint of a transformers architecture, loadable without surgery.

API::

    surgery.export("runs/smollm2-hybrid", "runs/smollm2-hybrid-bamba", to="bamba")   # -> Path
    # then, anywhere with plain transformers:
    AutoModelForCausalLM.from_pretrained("runs/smollm2-hybrid-bamba")                # no trust_remote_code

Targets register themselves with :func:`register_target`; ``bamba`` (``BambaForCausalLM``) takes
Llama-layout students (llama, mistral, qwen2, qwen3) with ``mamba2`` mixers. A target refuses
(:class:`ExportError`, every mismatch named, nothing written) whatever it cannot express exactly,
and every written directory is loaded back with plain transformers and checked against the student.

Modules, one job each (``export`` is not a module name: importing a submodule binds its name on
the package, which would shadow ``surgery.export``)::

    target         ExportError, the Target base class, the registry
    source         the student directory loaded for export
    bamba          the bamba target: what it cannot express, its config
    bamba_tensors  the student's tensors renamed and fused into Bamba's layout
    exactness      the check: plain transformers computes the student
    card           README.md of the export
    exporting      export(): checks, files, check, atomic publish
"""

from __future__ import annotations

from .exporting import export
from .target import TARGETS, ExportError, Target, get_target, register_target

__all__ = ["TARGETS", "ExportError", "Target", "export", "get_target", "register_target"]
