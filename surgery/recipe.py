"""The recipe format: one readable schema for everything ``surgery apply`` does.

A recipe is YAML validated by the Pydantic models below (``extra="forbid"``
everywhere, a description on every field; NaN/infinity and true/false for numbers
refused). YAML is read with limits (:mod:`surgery.safe_yaml`: UTF-8, duplicate keys,
nesting, alias expansion). Loading supports one level of
``base:`` inheritance (the base is deep-merged under the recipe; lists are
replaced, not appended) and command-line overrides ``key.path=value`` whose
values are parsed as YAML and typed by the schema. Every error names the field
path and what was expected, and is raised as :class:`RecipeError` before
anything is written.

    recipe = Recipe.load("recipes/smollm2_mamba.yaml", overrides=["stages.stage3.lr=1e-4"])
    print(recipe.to_yaml())
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import RecipeError, suggest
from .output_dir import output_name_problem
from .safe_yaml import parse_yaml, read_yaml_file
from .strict_numbers import NumbersNotBools

SEED_LIMIT = 1 << 63  # seeds are 64-bit integers (torch.manual_seed)

# --------------------------------------------------------------------------- building blocks


class StrictModel(NumbersNotBools):
    """Base for every recipe section: unknown keys, NaN/infinity and true/false for numbers are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)


class TeacherConfig(StrictModel):
    """Which pretrained Transformer to start from."""

    model: str = Field(
        description=(
            "Teacher reference: 'builtin:smollm2-135m' (the embedded SmolLM2-135M, offline), "
            "'random:<family>' (tiny random model: llama, qwen2, qwen3, mistral, gemma, gemma3, phi, "
            "gpt_neox, gpt2, opt), a local Hugging Face model directory, or a hub id "
            "optionally pinned as 'org/name@revision'."
        ),
        min_length=1,
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit); overrides an '@rev' suffix in model."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Dtype to load the teacher in; 'auto' follows `precision`."
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the hub repository to run. Off unless set explicitly."
    )


class SamplingConfig(StrictModel):
    """How ``builtin:teacher-samples`` draws documents from the teacher (distillation data on its own distribution)."""

    length: int = Field(default=512, ge=8, le=32768, description="New tokens per sample (one document each).")
    temperature: float = Field(default=1.0, gt=0, le=10, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0, le=1, description="Nucleus sampling mass.")
    batch_size: int = Field(default=64, gt=0, le=4096, description="Samples generated together.")
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompts to start samples from, used in turn; empty: every sample starts from the BOS token alone.",
    )
    static_cache: bool = Field(
        default=True,
        description="On CUDA, generate with a static KV cache (transformers compiles the decoding step); "
        "false: the dynamic cache.",
    )


class DataSource(StrictModel):
    """One text source; several are mixed by weight."""

    source: str = Field(
        description=(
            "'builtin:python-stdlib' (the standard library's .py files), 'builtin:python-packages' (the .py "
            "files of the installed third-party packages but networkx, which bench/quality.py scores on), 'builtin:python-docs' "
            "(pydoc_data English reference prose), 'builtin:wikipedia' (English Wikipedia articles shipped "
            "in gensim's wheel), 'builtin:news' (the Lee news corpus, likewise; kept for evaluation), "
            "'builtin:teacher-samples' (text sampled from the teacher itself, see `sampling`), a glob of "
            "local .txt/.jsonl files, or 'hf:<dataset>[/<config>]' for a Hugging Face dataset (needs "
            "network or a local cache)."
        ),
        min_length=1,
    )
    sampling: SamplingConfig | None = Field(
        default=None, description="builtin:teacher-samples only: how samples are drawn (defaults apply when omitted)."
    )

    @model_validator(mode="after")
    def _sampling_only_for_samples(self) -> DataSource:
        if self.sampling is not None and self.source != "builtin:teacher-samples":
            raise ValueError(f"sampling applies to builtin:teacher-samples only, not {self.source!r}")
        return self
    weight: float = Field(default=1.0, gt=0, description="Relative share of tokens drawn from this source.")
    text_field: str = Field(default="text", description="Field holding the text in .jsonl files and datasets.")
    split: str = Field(default="train", description="Dataset split for 'hf:' sources.")
    streaming: bool = Field(
        default=True,
        description=(
            "'hf:' sources: stream rows in a seeded order and stop at the token budget (no full download); "
            "false downloads the whole split first. Ignored for other sources."
        ),
    )


class DataConfig(StrictModel):
    """Training and held-out text: tokenized with the teacher's tokenizer and packed."""

    sources: list[DataSource] = Field(min_length=1, description="Text sources, mixed by weight.")
    seq_len: int = Field(default=512, ge=8, le=1 << 20, description="Tokens per packed training sequence.")
    heldout_fraction: float = Field(
        default=0.05, gt=0, lt=0.5, description="Fraction of documents held out for evaluation (never trained on)."
    )
    seed: int | None = Field(
        default=None, ge=0, lt=SEED_LIMIT, description="Seed for document split and batch order; defaults to `seed`."
    )
    max_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Stop tokenizing after this many tokens (default: enough for every stage budget plus evaluation).",
    )
    max_epochs: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Most passes over the training tokens a stage may make. A plan whose stage budget needs more is refused "
            "once the data is tokenized, before training, with an estimate of how long it would take; raise this "
            "to train on repeated data on purpose."
        ),
    )

    @field_validator("sources", mode="before")
    @classmethod
    def _source_shorthand(cls, value: Any) -> Any:
        """Allow a bare string for a source: ``sources: [builtin:python-stdlib]``."""
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"source": v} if isinstance(v, str) else v for v in value]
        return value


class Schedule(StrictModel):
    """Warmup-stable-decay learning-rate schedule, in fractions of the stage's optimizer steps."""

    warmup: float = Field(default=0.1, ge=0, le=1, description="Fraction of steps warming up linearly from 0.")
    decay: float = Field(default=0.2, ge=0, le=1, description="Fraction of steps (at the end) decaying linearly.")
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="Learning rate at the end, relative to `lr`.")

    @model_validator(mode="after")
    def _fits(self) -> Schedule:
        if self.warmup + self.decay > 1:
            raise ValueError(f"warmup + decay must be at most 1 (got {self.warmup} + {self.decay})")
        return self


class StageConfig(StrictModel):
    """Options shared by the three MOHAWK stages."""

    enabled: bool = Field(default=True, description="Run this stage.")
    tokens: int = Field(
        default=65536, gt=0,
        description="Token budget: training stops after this many tokens (rounded up to whole tokens_per_step steps).",
    )
    tokens_per_step: int = Field(
        default=8192, gt=0, description="Tokens per optimizer step; reached by gradient accumulation."
    )
    micro_batch: int = Field(default=4, gt=0, description="Sequences per forward/backward pass.")
    seq_len: int | None = Field(default=None, ge=8, description="Sequence length for this stage; default data.seq_len.")
    lr: float = Field(default=1e-3, gt=0, le=10, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas.")
    grad_clip: float | None = Field(default=1.0, gt=0, description="Clip the global gradient norm to this; null: off.")
    schedule: Schedule = Field(default_factory=Schedule, description="Learning-rate schedule.")
    checkpoint_every: int = Field(
        default=50, gt=0, description="Write a resumable checkpoint every this many optimizer steps."
    )
    log_every: int = Field(default=1, gt=0, description="Append to metrics.jsonl every this many optimizer steps.")


class Stage1Config(StageConfig):
    """Stage 1, matrix orientation: student mixing matrix vs teacher attention matrix, per node."""

    tokens: int = Field(
        default=32768, gt=0,
        description="Token budget: training stops after this many tokens (rounded up to whole tokens_per_step steps).",
    )
    lr: float = Field(default=1e-3, gt=0, le=10, description="Peak learning rate (AdamW).")


class Stage2Config(StageConfig):
    """Stage 2, hidden-state alignment: student vs teacher block output, per block."""

    target: Literal["block", "mixer"] = Field(
        default="block",
        description="Align the whole block output ('block') or only the mixer output before the residual ('mixer').",
    )
    compile: bool = Field(
        default=False,
        description="Run the student's converted decoder blocks under torch.compile while this stage trains: "
        "inductor fuses each block's many small kernels (GPU at micro-batch 32 and the 2-core CPU: 1.2-2.2x per stage, docs/benchmarks.md); "
        "the first step pays the compilation. One process only (not under torchrun).",
    )


class Stage3Config(StageConfig):
    """Stage 3, knowledge distillation: student vs teacher logits, end to end."""

    lr: float = Field(default=1e-4, gt=0, le=10, description="Peak learning rate (AdamW).")
    temperature: float = Field(default=1.0, gt=0, description="Softmax temperature for the KL term.")
    kl_weight: float = Field(default=1.0, ge=0, description="Weight of KL(teacher || student).")
    ce_weight: float = Field(default=0.0, ge=0, description="Weight of hard-label next-token cross-entropy.")
    train: Literal["all", "mixers", "non_embedding"] = Field(
        default="all", description="Which student parameters train: all, only replaced mixers, or all but embeddings/head."
    )
    compile: bool = Field(
        default=False,
        description="Run the student's converted decoder blocks (and the teacher's) under torch.compile while this stage trains: "
        "inductor fuses each block's many small kernels (GPU at micro-batch 32 and the 2-core CPU: 1.2-2.2x per stage, docs/benchmarks.md); "
        "the first step pays the compilation. One process only (not under torchrun).",
    )

    @model_validator(mode="after")
    def _some_loss(self) -> Stage3Config:
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ValueError("kl_weight and ce_weight are both 0: nothing to train on")
        return self


class Stages(StrictModel):
    """The three MOHAWK stages, run in order; any subset may be enabled."""

    stage1: Stage1Config = Field(default_factory=Stage1Config, description="Matrix orientation (per node).")
    stage2: Stage2Config = Field(default_factory=Stage2Config, description="Hidden-state alignment (per block).")
    stage3: Stage3Config = Field(default_factory=Stage3Config, description="Knowledge distillation (end to end).")


class VerifyConfig(StrictModel):
    """Held-out evaluation run before and after each stage."""

    tokens: int = Field(default=8192, gt=0, description="Held-out tokens per evaluation.")
    seq_len: int | None = Field(default=None, ge=8, description="Sequence length for evaluation; default data.seq_len.")
    micro_batch: int = Field(default=4, gt=0, description="Sequences per evaluation forward pass.")
    stage1_tokens: int | None = Field(
        default=None, gt=0, description="Held-out tokens for the (quadratic) stage-1 metric; default: one micro-batch."
    )


class OutputConfig(StrictModel):
    """Where and how the student is written."""

    dir: str = Field(description="Output directory for the student; written atomically at the end of the run.")
    overwrite: bool = Field(default=False, description="Replace an existing output directory.")
    keep_checkpoints: bool = Field(default=False, description="Keep the run's checkpoints after success.")
    shard_size: str = Field(
        default="2GB", pattern=r"^\d+(\.\d+)?\s*[KMG]?B$", description="Shard model.safetensors above this size."
    )

    @field_validator("dir")
    @classmethod
    def _names_a_directory(cls, value: str) -> str:
        problem = output_name_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class DistributedConfig(StrictModel):
    """How a ``torchrun`` launch spreads the stages over ranks; a single-process run ignores it.

    Stages 1 and 2 are data-parallel (every rank holds teacher and student; gradients are summed
    over ranks each optimizer step); stage 3 shards the student with FSDP2 (``fully_shard``).
    """

    fsdp_param_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description=(
            "Stage 3, FSDP2 MixedPrecisionPolicy.param_dtype: the dtype the student's parameters are gathered "
            "and computed in. float32 keeps the single-process numerics (bf16 compute still comes from autocast, "
            "see `precision`); bfloat16 halves the all-gather traffic and the gathered layers' memory."
        ),
    )
    fsdp_reduce_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="Stage 3, FSDP2 MixedPrecisionPolicy.reduce_dtype: dtype of the gradient reduce-scatter."
    )
    fsdp_reshard_after_forward: bool = Field(
        default=True,
        description="Stage 3: free each decoder layer's gathered parameters after its forward (gathered again "
        "for backward): less memory, one more all-gather per layer and micro-batch.",
    )


AUTO_LAYERS = "auto"  # ``layers: auto``: chosen by :mod:`surgery.layer_choice` from the teacher's activations
_LAYER_SLICE = re.compile(r"^\s*-?\d*\s*(:\s*-?\d*\s*(:\s*-?\d+\s*)?)?$")


class ReplaceRule(StrictModel):
    """One rule: a selector (which attention nodes) and what to put there.

    Selector fields compose (a node must satisfy all given). Rules apply in
    order; a node takes the first rule that matches it.
    """

    modules: str | list[str] | None = Field(
        default=None,
        description=(
            "Glob(s) over module paths: '*' is one path segment, '**' any number "
            "(e.g. 'model.layers.*.self_attn'); a 're:' prefix makes it a full regex."
        ),
    )
    layers: int | list[int] | str | None = Field(
        default=None,
        description=(
            "Layer indices: an int, a list ([0, 2, 5]) or a Python slice string ('0:24:2', '-4:'); or 'auto' "
            "with `count` and `mixer: keep`: keep the `count` attention layers that change the residual stream "
            "most on the recipe's text (surgery plan shows the ranking)."
        ),
    )
    count: int | None = Field(
        default=None, gt=0, description="With `layers: auto`: how many attention layers the rule takes."
    )
    type: str | None = Field(
        default=None,
        description="Teacher module class name (e.g. 'LlamaAttention') or the alias 'attention' (the default).",
    )
    exclude: str | list[str] | None = Field(
        default=None, description="Glob(s) or 're:' regexes of module paths to leave out."
    )
    mixer: str = Field(description="Rewrite rule to apply: 'discrete_mamba2', 'mamba2', 'toeplitz', 'low_rank', 'semiseparable' or 'keep'.")
    params: dict[str, Any] = Field(default_factory=dict, description="Mixer parameters (see `surgery schema`).")
    init: dict[str, Any] = Field(default_factory=dict, description="Initialisation / weight-transfer options.")

    @field_validator("layers")
    @classmethod
    def _layers_syntax(cls, value: Any) -> Any:
        if value == AUTO_LAYERS:
            return value
        if isinstance(value, str) and not _LAYER_SLICE.match(value):
            raise ValueError(f"{value!r} is not a layer slice; write e.g. '0:24:2', '-4:' or a list like [0, 2, 5]")
        if isinstance(value, str) and re.search(r":\s*0\s*$", value) and value.count(":") == 2:
            raise ValueError(f"layer slice {value!r} has step 0")
        return value

    @model_validator(mode="after")
    def _auto_layers(self) -> ReplaceRule:
        if self.layers == AUTO_LAYERS:
            if self.mixer != "keep":
                raise ValueError(
                    f"layers: auto chooses the attention layers to keep; it needs mixer: keep (got {self.mixer!r}), "
                    f"followed by a rule replacing the rest"
                )
            if self.count is None:
                raise ValueError("layers: auto needs count: how many attention layers to keep (e.g. count: 7)")
        elif self.count is not None:
            raise ValueError("count is for layers: auto; with explicit layers, list them instead")
        return self

    @model_validator(mode="before")
    @classmethod
    def _rule_known(cls, data: Any) -> Any:
        """Check ``mixer`` against the rule registry and fill ``params``/``init`` defaults."""
        if not isinstance(data, dict) or not isinstance(data.get("mixer"), str):
            return data  # field validation reports the problem
        from rewrites.registry import validate_rule_options

        params, init = data.get("params") or {}, data.get("init") or {}
        if not isinstance(params, dict) or not isinstance(init, dict):
            return data
        data = dict(data)
        data["params"], data["init"] = validate_rule_options(data["mixer"], params, init)
        return data


class Recipe(StrictModel):
    """A complete surgery job: teacher, data, what to replace, how to distil, where to write."""

    name: str | None = Field(default=None, description="Short name for the run, used in reports.")
    description: str | None = Field(default=None, description="Free text describing the recipe.")
    teacher: TeacherConfig = Field(description="The pretrained Transformer to convert.")
    data: DataConfig = Field(description="Training and evaluation text.")
    replace: list[ReplaceRule] = Field(
        default_factory=list, description="Ordered replace rules; empty means identity (nothing replaced)."
    )
    stages: Stages = Field(default_factory=Stages, description="The three MOHAWK stages.")
    verify: VerifyConfig = Field(default_factory=VerifyConfig, description="Held-out evaluation settings.")
    output: OutputConfig = Field(description="Where the student goes.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Multi-process (torchrun) settings; ignored by one process."
    )
    seed: int = Field(default=0, ge=0, lt=SEED_LIMIT, description="Global seed (data order, initialisation).")
    device: str = Field(
        default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$", description="'auto' (CUDA if present), 'cpu', 'cuda[:N]'."
    )
    precision: Literal["auto", "fp32", "bf16", "bf16-if-native"] = Field(
        default="auto",
        description="'auto': bf16 autocast on CUDA, float32 on CPU; 'bf16-if-native': bf16 autocast where the hardware "
        "multiplies bf16 (GPUs from Ampere on; CPUs with AVX512-BF16 or AMX, about 2x faster training there), "
        "float32 on others. "
        "Weights stay float32 (autocast).",
    )
    _notes: list[str] = PrivateAttr(default_factory=list)  # what validation adjusted (budgets rounded up)

    @model_validator(mode="after")
    def _stage_shapes(self) -> Recipe:
        for name in ("stage1", "stage2", "stage3"):
            stage: StageConfig = getattr(self.stages, name)
            seq_len = stage.seq_len or self.data.seq_len
            per_pass = stage.micro_batch * seq_len
            if stage.tokens_per_step % per_pass:
                raise ValueError(
                    f"stages.{name}.tokens_per_step ({stage.tokens_per_step}) must be a multiple of "
                    f"micro_batch * seq_len ({stage.micro_batch} * {seq_len} = {per_pass})"
                )
            if stage.enabled and stage.tokens < stage.tokens_per_step:
                raise ValueError(
                    f"stages.{name}.tokens ({stage.tokens}) is less than one optimizer step "
                    f"(tokens_per_step = {stage.tokens_per_step})"
                )
            if stage.enabled and stage.tokens % stage.tokens_per_step:
                steps = -(-stage.tokens // stage.tokens_per_step)
                self._notes.append(
                    f"stages.{name}.tokens ({stage.tokens}) is not a multiple of tokens_per_step "
                    f"({stage.tokens_per_step}): rounded up to {steps * stage.tokens_per_step} ({steps} optimizer steps)"
                )
                stage.tokens = steps * stage.tokens_per_step
        return self

    @model_validator(mode="after")
    def _stages_have_nodes(self) -> Recipe:
        from rewrites.registry import rule_options

        if any(rule_options(rule.mixer).replaces for rule in self.replace):
            return self
        needy = [f"stage{i}" for i in (1, 2) if self.stage(i).enabled]
        if needy:
            what = "every replace rule keeps attention" if self.replace else "replace: is empty (identity)"
            raise ValueError(
                f"{what}, so no node is replaced, but {' and '.join(needy)} train replaced nodes; add a rule with a "
                f"mixer, or disable {', '.join(f'stages.{n}' for n in needy)} (enabled: false)"
            )
        return self

    @model_validator(mode="after")
    def _one_auto_rule(self) -> Recipe:
        auto = [i for i, rule in enumerate(self.replace) if rule.layers == AUTO_LAYERS]
        if len(auto) > 1:
            raise ValueError(f"replace rules {auto} all say layers: auto; one rule chooses the layers to keep")
        return self

    # ----------------------------------------------------------------- helpers

    @property
    def notes(self) -> list[str]:
        """What validation adjusted, e.g. a stage budget rounded up to whole optimizer steps."""
        return list(self._notes)

    def stage(self, index: int) -> StageConfig:
        """Stage config by number (1, 2, 3)."""
        return getattr(self.stages, f"stage{index}")

    def seq_len(self, index: int) -> int:
        """Effective sequence length of stage ``index``."""
        return self.stage(index).seq_len or self.data.seq_len

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed is None else self.data.seed

    def to_yaml(self) -> str:
        """The fully resolved recipe (defaults filled in) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        """Load a YAML recipe (with ``base:`` and ``key.path=value`` overrides) and validate it."""
        raw, base = read_recipe_file(path)
        return cls.from_dict(raw, overrides, source=str(path) + (f" (with base {base})" if base else ""))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] | None = None, source: str = "recipe") -> Recipe:
        """Validate a plain dict (after applying overrides)."""
        raw = apply_overrides(raw, overrides or [])
        try:
            recipe = cls.model_validate(raw)
        except ValidationError as err:
            raise RecipeError(format_validation_error(err, source)) from None
        for note in recipe.notes:
            logging.getLogger("surgery").warning(f"{source}: {note}")
        return recipe

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """JSON Schema of the recipe format (printed by ``surgery schema``)."""
        schema = cls.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = "surgery recipe"
        return schema


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path, what: str = "recipe file") -> dict[str, Any]:
    data = read_yaml_file(path, what)
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty; it needs at least teacher, data and output")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (teacher:, data:, ...), got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge ``top`` over ``base``: mappings merge recursively, anything else is replaced."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_raw(path: str | Path) -> dict[str, Any]:
    """Read a recipe file and resolve its ``base:`` (one level, relative to the file)."""
    return read_recipe_file(path)[0]


def read_recipe_file(path: str | Path) -> tuple[dict[str, Any], Path | None]:
    """(the recipe file's mapping with its ``base:`` merged under it, the base file or None)."""
    path = Path(path)
    data = _read_yaml(path)
    base_ref = data.pop("base", None)
    if base_ref is None:
        return data, None
    if not isinstance(base_ref, str) or not base_ref.strip():
        raise RecipeError(f"{path}: base: must be the path of another recipe file, got {base_ref!r}")
    base_path = (path.parent / base_ref).resolve()
    try:
        base = _read_yaml(base_path, "base recipe file")
    except RecipeError as err:
        raise RecipeError(f"{path}: base: {err}") from None
    if "base" in base:
        raise RecipeError(
            f"{path}: base recipe {base_ref} has its own base:; only one level of inheritance is supported"
        )
    unknown = [str(k) for k in base if k not in Recipe.model_fields]
    if unknown:
        raise RecipeError(
            f"{path}: base: {base_path} is not a recipe: its top level has {unknown[0]!r}"
            f"{suggest(unknown[0], Recipe.model_fields)}; recipe sections are {', '.join(Recipe.model_fields)}"
        )
    return deep_merge(base, data), base_path


# --------------------------------------------------------------------------- overrides


def _parse_path(path: str) -> list[str]:
    parts = path.split(".")
    if not path or any(not p for p in parts):
        raise RecipeError(f"override path {path!r} is malformed; write e.g. stages.stage1.lr=1e-3")
    return parts


def _field_model(annotation: Any) -> type[BaseModel] | None:
    """The Pydantic model inside an annotation (``Model``, ``Model | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _field_model(arg)
        if found is not None:
            return found
    return None


def _check_path(parts: list[str]) -> None:
    """Raise if ``parts`` is not a path the schema knows (free-form dicts accept any key)."""
    model: type[BaseModel] | None = Recipe
    walked: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if model is None:
            return  # inside a free-form dict (params:, init:)
        fields = model.model_fields
        if part not in fields:
            where = ".".join(walked) or "the recipe"
            raise RecipeError(
                f"override {'.'.join(parts)}: {where} has no field {part!r}{suggest(part, fields)}; "
                f"fields there: {', '.join(fields)}"
            )
        annotation = fields[part].annotation
        walked.append(part)
        i += 1
        origin = getattr(annotation, "__origin__", None)
        if origin is list and i < len(parts):
            if not parts[i].lstrip("-").isdigit():
                raise RecipeError(
                    f"override {'.'.join(parts)}: {'.'.join(walked)} is a list; index it with a number, "
                    f"e.g. {'.'.join(walked)}.0.{parts[i]}"
                )
            walked.append(parts[i])
            i += 1
            annotation = annotation.__args__[0]
        model = _field_model(annotation)
        if model is None and i < len(parts) and origin is not dict and "dict" not in str(annotation):
            raise RecipeError(f"override {'.'.join(parts)}: {'.'.join(walked)} is a value, not a section")


def _parse_value(text: str) -> Any:
    """An override's value as YAML, except text YAML would turn into a mapping by accident (``1:``)."""
    if not text.strip():
        return ""
    try:
        value = parse_yaml(text, f"override value {text!r}")
    except RecipeError as err:
        if "not valid YAML" in str(err):
            return text
        raise
    if isinstance(value, dict) and not text.lstrip().startswith("{"):
        return text
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are YAML (``3``, ``true``, ``[0, 2]``, ``null``)."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} has no '='; write key.path=value, e.g. stages.stage1.lr=1e-3")
        path, _, text = item.partition("=")
        parts = _parse_path(path.strip())
        _check_path(parts)
        value = _parse_value(text)
        node: Any = raw
        for j, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                idx = int(part)
                if not -len(node) <= idx < len(node):
                    raise RecipeError(
                        f"override {path}: {'.'.join(parts[:j])} has {len(node)} entries; index {idx} is out of range"
                    )
                node = node[idx]
                continue
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last)
            if not -len(node) <= idx < len(node):
                raise RecipeError(f"override {path}: index {idx} is out of range ({len(node)} entries)")
            node[idx] = value
        else:
            node[last] = value
    return raw


# --------------------------------------------------------------------------- error formatting


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "tagged-union")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        if getattr(annotation, "__origin__", None) is list:
            annotation = annotation.__args__[0]
        model = _field_model(annotation)
    return list(model.model_fields) if model is not None else []


_UNION_TAG = re.compile(r"^(int|float|str|bool|none|list\[.*\]|dict\[.*\]|tuple\[.*\])$")
_TAG_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false", "none": "null"}


def _union_tag(e: dict[str, Any]) -> str | None:
    last = e["loc"][-1] if e["loc"] else None
    return last if isinstance(last, str) and _UNION_TAG.match(last) else None


def format_validation_error(err: ValidationError, source: str) -> str:
    """One readable message: each problem with its field path and what was expected."""
    lines = []
    unions: dict[tuple[Any, ...], list[str]] = {}
    errors = err.errors(include_url=False)
    for e in errors:
        tag = _union_tag(e)
        if tag is not None:
            unions.setdefault(tuple(e["loc"][:-1]), []).append(tag)
    reported: set[tuple[Any, ...]] = set()
    for e in errors:
        if _union_tag(e) is not None:
            key = tuple(e["loc"][:-1])
            if key in reported:
                continue
            reported.add(key)
            kinds = " or ".join(_TAG_WORDS.get(t, t.replace("list[int]", "a list of integers")) for t in unions[key])
            lines.append(f"{_loc(key)}: expected {kinds} (got {e.get('input')!r})")
            continue
        loc = _loc(e["loc"])
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            known = _known_fields(e["loc"])
            hint = suggest(key, known)
            allowed = f"; allowed: {', '.join(known)}" if known else ""
            lines.append(f"{loc}: unknown field{hint}{allowed}")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required field is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = e.get("input")
            given = "" if isinstance(shown, (dict, list)) or shown is None else f" (got {shown!r})"
            lines.append(f"{loc}: {msg}{given}")
    head = f"{source}: invalid recipe" + (f" ({len(lines)} problems)" if len(lines) > 1 else "")
    return head + "\n  " + "\n  ".join(lines)
