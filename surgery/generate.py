"""``surgery generate``: stream a continuation of a prompt from a student directory or any teacher reference.

    text = generate_text("runs/tiny", "def fibonacci(n):", GenerateOptions(max_new_tokens=32))

Students decode with their recurrent :class:`~surgery.cache.SurgeryCache` (constant memory per
token; ``surgery.load`` enables it), on CUDA by default through the captured decode step of
:mod:`surgery.graph_decode` where it applies (``graph=False`` opts out); teachers with their usual KV cache. Temperature 0 is greedy;
otherwise sampling with ``temperature`` and ``top_p`` from ``seed``. The prompt is echoed and the
continuation written to ``stream`` (stdout) piece by piece as tokens come; the continuation alone
is returned.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import torch

from .options import GenerateOptions

logger = logging.getLogger("surgery")

__all__ = ["batch_listing", "generate_text", "generate_texts", "generation_kwargs", "graph_decode_reason", "next_token"]


class _Streamer:
    """A ``generate`` streamer that writes decoded text to ``stream`` as soon as it is complete.

    Like ``transformers.TextStreamer`` (it decodes the tokens so far and writes the new suffix),
    but to any text stream, holding back a trailing replacement character (an incomplete
    multi-byte character) until the next token completes it.
    """

    def __init__(self, tokenizer: Any, stream: TextIO | None, skip_prompt: bool = True) -> None:
        self.tokenizer, self.stream = tokenizer, stream
        self.skip_prompt = skip_prompt
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("the streamer handles one sequence (batch size 1)")
            value = value[0]
        if self.skip_prompt and not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # wait for the rest of the character
            return
        self._write(text[self.printed :])
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._write(text[self.printed :])
        self.printed = len(text)

    def _write(self, piece: str) -> None:
        if self.stream is not None and piece:
            self.stream.write(piece)
            self.stream.flush()

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def generation_kwargs(opts: GenerateOptions, tokenizer: Any, model: Any) -> dict[str, Any]:
    """``model.generate`` keyword arguments for ``opts`` (greedy at temperature 0)."""
    kwargs: dict[str, Any] = {"max_new_tokens": opts.max_new_tokens}
    if opts.temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p, top_k=None)
    gen = getattr(model, "generation_config", None)
    if getattr(gen, "pad_token_id", None) is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is not None:
            kwargs["pad_token_id"] = pad
    return kwargs


def next_token(logits: torch.Tensor, opts: GenerateOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the next tokens from ``logits (b, V)``: greedy at temperature 0, else top-p sampling. -> (b, 1)."""
    if opts.temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / opts.temperature, dim=-1)  # (b, V)
    if opts.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > opts.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)


def graph_decode_reason(model: Any, ids: torch.Tensor) -> str | None:
    """Why :func:`generate_text` cannot decode ``model`` from ``ids (1, L)`` through the captured step (None: it can)."""
    from .graph_decode import graph_unsupported_reason

    if not ids.is_cuda:
        return "it needs a CUDA device"
    return graph_unsupported_reason(model)


def _graphed_generate(model: Any, tokenizer: Any, ids: torch.Tensor, opts: GenerateOptions, streamer: _Streamer,
                      *, required: bool) -> bool:
    """Prefill with the model's forward, then decode through :class:`~surgery.graph_decode.GraphedDecoder`.

    Returns False, having streamed nothing, when the decoder cannot be set up and not ``required``
    (the reason is logged as a warning; the caller then uses ``generate``).
    """
    from .graph_decode import GraphedDecoder
    from .hf_conventions import output_cache

    generator = torch.Generator(device=ids.device).manual_seed(opts.seed)
    try:
        out = model(ids, use_cache=True)
        token = next_token(out.logits[:, -1], opts, generator)  # (1, 1)
        decoder = GraphedDecoder(model, output_cache(out), token, capture=True, compile=opts.step_compile,
                                 max_len=ids.shape[1] + opts.max_new_tokens)  # sizes a hybrid's kept KV
    except Exception as err:  # noqa: BLE001 - the fast path is optional here: say why, then decode the usual way
        if required:
            raise
        logger.warning("CUDA-graph decoding could not be set up (%s: %s); decoding with generate",
                       type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False
    del out
    streamer.put(ids.cpu())  # the prompt (skipped by the streamer)
    eos = tokenizer.eos_token_id
    for i in range(opts.max_new_tokens):
        streamer.put(token.cpu())
        if eos is not None and int(token) == eos or i == opts.max_new_tokens - 1:
            break
        token = next_token(decoder(token), opts, generator)
    streamer.end()
    return True


def _graph_choice(model: Any, choice: bool | None, compile: bool | str = False) -> dict[str, Any]:
    """``generate``'s ``cuda_graph`` and ``compile_step`` keywords for a student (:mod:`surgery.graph_generate`);
    teachers take none."""
    return {"cuda_graph": choice, "compile_step": compile} if hasattr(model, "new_surgery_cache") else {}


def batch_listing(prompts: list[str], texts: list[str]) -> str:
    """Prompts and continuations for a terminal: each under a ``--- i/n ---`` line."""
    n = len(prompts)
    return "".join(f"--- {i}/{n} ---\n{p}{t}\n" for i, (p, t) in enumerate(zip(prompts, texts), 1))


def _load(model_ref: str, opts: GenerateOptions) -> tuple[Any, Any, torch.device]:
    from .runtime import resolve_device
    from .student import load_model_ref

    device = resolve_device(opts.device)
    loaded = load_model_ref(model_ref, device=device)
    torch.manual_seed(opts.seed)
    return loaded.model, loaded.tokenizer, device


@torch.inference_mode()
def generate_text(model_ref: str, prompt: str, opts: GenerateOptions | None = None, *,
                  stream: TextIO | None = sys.stdout, graph: bool | None = None) -> str:
    """Continue ``prompt`` with a student directory or teacher reference; returns the continuation.

    ``stream``: where the prompt and the continuation are written as they come (None: silent).
    ``graph``: None (default) decodes a student through the captured CUDA-graph step on CUDA when
    it applies (:func:`graph_decode_reason`; why not is logged), else with ``generate``; False
    always uses ``generate`` (the opt-out; ``opts.no_cuda_graph``, ``--no-cuda-graph``, does the same).
    ``opts.cuda_graph`` (or ``opts.compile``) requires the graph and raises when it does not apply.
    """
    from .errors import SurgeryError

    opts = opts or GenerateOptions()
    model, tokenizer, device = _load(model_ref, opts)
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"].to(device)  # (1, L)
    if ids.shape[1] == 0:
        raise SurgeryError("the prompt encodes to no tokens; give some text to continue")
    if opts.no_cuda_graph:
        graph = False
    use_graph = False
    flag = opts.graph_flag
    if flag or graph is not False:
        reason = graph_decode_reason(model, ids)
        if flag and not ids.is_cuda:
            raise SurgeryError(f"{flag} needs a CUDA device (use --device cuda, or drop {flag})")
        if flag and reason is not None:
            raise SurgeryError(f"{flag}: {reason}; generate without {flag}")
        use_graph = reason is None
        if reason is not None:
            (logger.info if ids.is_cuda else logger.debug)("decoding with generate, not a CUDA graph: %s", reason)
    streamer = _Streamer(tokenizer, stream)
    if stream is not None:
        stream.write(prompt)
        stream.flush()
    graphed = use_graph and _graphed_generate(model, tokenizer, ids, opts, streamer, required=flag is not None)
    if not graphed:
        model.generate(ids, attention_mask=enc["attention_mask"].to(device), streamer=streamer,
                       **generation_kwargs(opts, tokenizer, model), **_graph_choice(model, False))
    if stream is not None:
        stream.write("\n")
        stream.flush()
    return streamer.text


@torch.inference_mode()
def generate_texts(model_ref: str, prompts: list[str], opts: GenerateOptions | None = None, *,
                   stream: TextIO | None = sys.stdout) -> list[str]:
    """Continue several prompts in one left-padded batch; returns the continuations, in order.

    Each prompt and its continuation are written to ``stream`` when the batch is done, under a
    ``--- i/n ---`` line (:func:`batch_listing`). Greedy results equal one :func:`generate_text`
    per prompt (the recurrent cache honours the padding). On CUDA a student's batch decodes through
    the captured step (:mod:`surgery.graph_generate`) where it applies, unless ``opts.no_cuda_graph``;
    ``opts.cuda_graph`` (or ``opts.compile``) makes "where it does not apply" an error.
    """
    from .errors import SurgeryError

    opts = opts or GenerateOptions()
    model, tokenizer, device = _load(model_ref, opts)
    flag = opts.graph_flag
    if flag and device.type != "cuda":
        raise SurgeryError(f"{flag} needs a CUDA device (use --device cuda, or drop {flag})")
    if flag and not hasattr(model, "new_surgery_cache"):
        raise SurgeryError(f"{flag} decodes students (a teacher has no recurrent state); drop {flag}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    empty = [i for i, row in enumerate(enc["attention_mask"]) if not row.any()]
    if empty:
        raise SurgeryError(f"prompt {empty[0] + 1} encodes to no tokens; give some text to continue")
    width = enc["input_ids"].shape[1]
    choice = True if opts.cuda_graph else False if opts.no_cuda_graph else None
    try:
        out = model.generate(enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             **generation_kwargs(opts, tokenizer, model),
                             **_graph_choice(model, choice, opts.step_compile))  # (b, width + new)
    except ValueError as err:
        if flag and "the captured decode step does not apply" in str(err):
            raise SurgeryError(f"{flag}: {err}; generate without {flag}") from err
        raise
    texts = [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.tolist()]
    if stream is not None:
        stream.write(batch_listing(prompts, texts))
        stream.flush()
    return texts
