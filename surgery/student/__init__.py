"""The student output directory: save, load, validate.

A student directory is a Hugging Face model directory of the *teacher's* family plus a
``surgery`` section in ``config.json`` that says which attention nodes became which mixers;
:mod:`surgery.student.layout` lists its files.

API::

    save_student(directory, student, tokenizer=, plan=, recipe=, teacher=, report=, report_md=)  # into a tmp dir
    save(student, directory, tokenizer=..., plan=...)     # the Python API; atomic, no recipe needed
    model = load(directory, device="cpu", dtype=None)    # a PreTrainedModel; generate() uses SurgeryCache
    tokenizer = load_tokenizer(directory)                 # the tokenizer lives beside, not on the model
    info = validate(directory)                            # every check load() makes, on the meta device

``load`` rebuilds the student from the directory alone (:mod:`surgery.student.loading`): no
teacher weights, no network, no pickle. The tokenizer is not attached to the model: it is an
ordinary Hugging Face tokenizer in the same directory, loaded with :func:`load_tokenizer` (or
``AutoTokenizer.from_pretrained(directory)``). Anything wrong with a directory raises
:class:`~surgery.errors.StudentError` naming the file and the fix.

Modules, one job each (none is named after a function exported here: importing a submodule
binds its name on the package)::

    layout       file names, format version, is_student_dir
    dtypes       dtype names of config.json and safetensors headers
    tensors      which tensors are stored (each once; tied aliases)
    nodes        the surgery.nodes list from a module tree or a plan
    config       config.json: the surgery section written, read back and checked
    weights      safetensors files: whole or sharded + index; found, opened, headers read
    provenance   provenance.json and the teacher's license
    card         the README.md model card
    tokenizer    load_tokenizer
    build        the module tree rebuilt from config.json (mixers spliced in)
    validation   validate, StudentInfo: config, headers and built model checked together
    loading      load: the weights streamed into the rebuilt model
    auto_class   modeling_surgery.py and auto_map: transformers' Auto classes load a student via load
    saving       save_student, save
    refs         load_model_ref: a student directory or any teacher reference
"""

from __future__ import annotations

from .layout import is_student_dir
from .loading import load
from .nodes import student_nodes
from .refs import LoadedModel, load_model_ref
from .saving import save, save_student
from .tokenizer import load_tokenizer
from .validation import StudentInfo, validate

__all__ = [
    "LoadedModel",
    "StudentInfo",
    "is_student_dir",
    "load",
    "load_model_ref",
    "load_tokenizer",
    "save",
    "save_student",
    "student_nodes",
    "validate",
]
