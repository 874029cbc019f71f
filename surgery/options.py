"""Command options, declared once as Pydantic models; the CLI derives its flags from them.

Each field becomes ``--field-name`` with the field's description as help, its
type as parser type (``bool`` -> a switch, ``Literal`` -> choices), and its
default. The same models are what the Python API takes, so a flag and its
Python keyword cannot drift apart.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SurgeryError


class Options(BaseModel):
    """Base for command options (NaN and infinity are not numbers here)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ApplyOptions(Options):
    """Options of ``surgery apply``."""

    out: str | None = Field(default=None, description="Output directory (overrides output.dir in the recipe).")
    resume: bool = Field(default=False, description="Continue an interrupted run from its last checkpoint.")
    restart: bool = Field(default=False, description="Discard an interrupted run's checkpoints and start over.")
    overwrite: bool = Field(default=False, description="Replace an existing output directory.")


class DiffOptions(Options):
    """Options of ``surgery diff``."""

    format: Literal["text", "json", "html"] = Field(default="text", description="Output format.")
    output: str | None = Field(default=None, description="Write to this file instead of standard output.")


class PlanOptions(Options):
    """Options of ``surgery plan``."""

    format: Literal["text", "json"] = Field(default="text", description="Output format.")


class EvalOptions(Options):
    """Options of ``surgery eval`` and ``surgery verify``."""

    data: str = Field(
        default="builtin:python-docs",
        description="Text to evaluate on: builtin:python-docs, builtin:python-stdlib, a file glob, or hf:<dataset>.",
    )
    tokens: int = Field(default=8192, gt=0, description="Held-out tokens to evaluate.")
    seq_len: int = Field(default=512, ge=8, description="Sequence length.")
    batch_size: int = Field(default=4, gt=0, description="Sequences per forward pass.")
    device: str = Field(default="auto", description="auto, cpu or cuda[:N].")


class GenerateOptions(Options):
    """Options of ``surgery generate``."""

    max_new_tokens: int = Field(default=64, gt=0, description="Tokens to generate.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    seed: int = Field(default=0, ge=0, lt=1 << 63, description="Sampling seed.")
    device: str = Field(default="auto", description="auto, cpu or cuda[:N].")
    cuda_graph: bool = Field(
        default=False,
        description="Require the captured CUDA-graph decode step (on CUDA it is already the default for students "
        "where it applies; this makes a student where it does not an error instead of a fallback).",
    )
    no_cuda_graph: bool = Field(
        default=False,
        description="Decode with transformers' generate, never through the captured CUDA-graph step.",
    )
    compile: Literal["off", "on", "tuned"] = Field(
        default="off",
        description="torch.compile the captured decode step before capturing it (CUDA): 'on' with inductor's "
        "defaults, 'tuned' with coordinate-descent tuning, the fastest at batch 1 (0.9 ms/token against 4.5 "
        "uncompiled for SmolLM2's student on an H200). Compiling takes 30-60 s, once per model and process. "
        "Like --cuda-graph, a student the captured step does not apply to is an error.",
    )

    @model_validator(mode="after")
    def _one_graph_choice(self) -> GenerateOptions:
        if self.cuda_graph and self.no_cuda_graph:
            raise ValueError("--cuda-graph and --no-cuda-graph contradict each other; give one")
        if self.compile != "off" and self.no_cuda_graph:
            raise ValueError(f"--compile {self.compile} compiles the captured decode step, which --no-cuda-graph "
                             "turns off; give one")
        return self

    @property
    def graph_flag(self) -> str | None:
        """The flag that requires the captured step (``--cuda-graph``, or ``--compile`` which compiles it), or None."""
        return "--cuda-graph" if self.cuda_graph else f"--compile {self.compile}" if self.compile != "off" else None

    @property
    def step_compile(self) -> bool | str:
        """``compile`` as :class:`~surgery.graph_decode.StaticDecoder` takes it (False, True or "tuned")."""
        return {"off": False, "on": True}.get(self.compile, self.compile)


class ApproximateOptions(Options):
    """Options of ``surgery approximate`` (MOHAWK Table 3 on a teacher: how well each mixer family fits its attention)."""

    teacher: str = Field(default="builtin:smollm2-135m", description="Teacher reference whose attention is approximated.")
    data: str = Field(
        default="builtin:wikipedia",
        description="Held-out text (the eval split): builtin:wikipedia, builtin:news, builtin:python-docs, a glob, hf:<dataset>.",
    )
    samples: int = Field(default=1, gt=0, description="Held-out sequences (the paper: 1000).")
    samples_per_fit: int | None = Field(
        default=None, gt=0,
        description="Sequences whose matrices are fitted together as one batch; default: all of them on CUDA, 1 on CPU.",
    )
    seq_len: int = Field(default=512, ge=8, description="Tokens per sequence (the paper: 512).")
    heads_per_layer: str = Field(default="1", description="Query heads sampled per layer (seeded), or 'all'.")
    layers: str = Field(default="all", description="Layers to study: 'all' or a comma list, e.g. 0,14,29.")
    ranks: str = Field(default="16,32,64", description="Ranks / state sizes, comma separated.")
    families: str = Field(default="all", description="'all' or a comma list of toeplitz, low_rank, ssd, semiseparable.")
    steps: int = Field(default=100, ge=0, description="Adam steps per fit (Toeplitz is closed-form); more fit closer.")
    lr: float = Field(default=1e-2, gt=0, description="Adam learning rate of the fits.")
    float64: bool = Field(default=False, description="Fit in float64 (slower; float32 is the default).")
    seed: int = Field(default=0, ge=0, lt=1 << 63, description="Seed of the head sampling.")
    device: str = Field(default="auto", description="auto, cpu or cuda[:N].")
    out: str = Field(default="runs/approximate", description="Directory for approximate.{json,md,png}.")


class ExportOptions(Options):
    """Options of ``surgery export``."""

    to: str = Field(default="bamba", description="Native architecture to export to (surgery.native.TARGETS).")
    output: str | None = Field(default=None, description="Output directory of the native checkpoint (required).")
    overwrite: bool = Field(default=False, description="Replace an existing output directory.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, model: type[Options], short: dict[str, str] | None = None) -> None:
    """Add one flag per field of ``model`` to ``parser``."""
    short = short or {}
    for name, field in model.model_fields.items():
        flags = [_flag(name)] + ([short[name]] if name in short else [])
        help_text = field.description or ""
        annotation = field.annotation
        origin = typing.get_origin(annotation)
        if annotation is bool:
            parser.add_argument(*flags, dest=name, action="store_true", help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": name, "default": field.default}
        if origin is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif annotation in (int, float):
            kwargs["type"] = annotation
        metavar = name.upper()
        default = "" if field.default is None else f" (default: {field.default})"
        parser.add_argument(*flags, metavar=metavar if "choices" not in kwargs else None, help=help_text + default, **kwargs)


def options_from_args(model: type[Options], args: argparse.Namespace) -> Options:
    """Build ``model`` from the parsed flags; a bad value is a :class:`SurgeryError` naming the flag."""
    try:
        return model(**{name: getattr(args, name) for name in model.model_fields})
    except ValidationError as err:
        problems = [f"{_flag(str(e['loc'][0]))}: {e['msg']} (got {e.get('input')!r})" if e["loc"]
                    else str(e["msg"]).removeprefix("Value error, ") for e in err.errors(include_url=False)]
        raise SurgeryError("; ".join(problems)) from None
