"""``builtin:teacher-samples``: documents sampled from the teacher itself.

Distillation data on the teacher's own distribution, which needs no download (the student is
trained to match the teacher, so the teacher's samples are exactly where matching matters;
cf. sequence-level distillation, Kim & Rush 2016, arXiv 1606.07947). Documents are generated in
seeded batches (:class:`TeacherSampler`: BOS or the recipe's prompts, temperature, nucleus
sampling, a static KV cache on CUDA), one document per sample, decoded to text and tokenized
like any other source; the source is streamed, so its tokens go to the on-disk token cache
(keyed by the teacher's checksum and the sampling options) and the next run reuses them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import DataError
from ..recipe import DataSource, SamplingConfig
from .sources import Document, TextSource, derive_seed

log = logging.getLogger(__name__)


class TeacherSampler:
    """Generates text from a loaded teacher: ``sample(n, cfg, seed) -> n`` documents."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, identity: dict[str, Any]) -> None:
        self.model, self.tokenizer, self.identity = model, tokenizer, identity
        self._static_failed = False
        self._bf16: torch.nn.Module | None = None
        self.seconds = 0.0  # wall time spent generating and decoding, for the run's timings
        self.tokens = 0  # new tokens generated (EOS padding after a sample ends included)

    def _generator(self) -> torch.nn.Module:
        """The model that samples: on CUDA a bfloat16 copy (a static cache takes the model's dtype; autocast
        would hand it bfloat16 keys for float32 storage), elsewhere the teacher itself."""
        if self.device.type != "cuda":
            return self.model
        if self._bf16 is None:
            import copy

            self._bf16 = copy.deepcopy(self.model).to(torch.bfloat16).eval()
        return self._bf16

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prompts(self, n: int, cfg: SamplingConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask ``(n, P)``: BOS alone, or the recipe's prompts in a seeded turn."""
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise DataError("builtin:teacher-samples: the teacher's tokenizer has neither a BOS nor an EOS token")
        if not cfg.prompts:
            return torch.full((n, 1), start), torch.ones(n, 1, dtype=torch.long)
        offset = derive_seed("prompts", seed) % len(cfg.prompts)
        rows = [[start, *tok(cfg.prompts[(offset + i) % len(cfg.prompts)], add_special_tokens=False).input_ids]
                for i in range(n)]
        width = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else start
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return ids, mask

    @torch.inference_mode()
    def sample(self, n: int, cfg: SamplingConfig, seed: int) -> list[str]:
        """``n`` documents of up to ``cfg.length`` new tokens (a sample may stop at EOS), seeded."""
        t0 = time.perf_counter()
        ids, mask = self._prompts(n, cfg, seed)
        device = self.device
        kwargs: dict[str, Any] = {
            "do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": None,
            "max_new_tokens": cfg.length, "pad_token_id": self.tokenizer.eos_token_id,
        }
        static = cfg.static_cache and device.type == "cuda" and not self._static_failed
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the run's own random state is left as it was
            torch.manual_seed(seed)
            try:
                out = self._generate(ids.to(device), mask.to(device), kwargs, static)
            except Exception as err:  # a static cache / compiled step this model or version cannot do
                if not static:
                    raise
                self._static_failed = True
                log.warning("teacher samples: static-cache generation failed (%s); using the dynamic cache", err)
                torch.manual_seed(seed)
                out = self._generate(ids.to(device), mask.to(device), kwargs, False)
        new = out[:, ids.shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.tokens += new.numel()
        log.info("teacher samples: %d documents, %d tokens in %.1f s (%.0f tokens/s)", n, new.numel(), seconds,
                 new.numel() / max(seconds, 1e-9))
        return texts

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, kwargs: dict[str, Any], static: bool) -> torch.Tensor:
        extra = {"cache_implementation": "static"} if static else {}
        return self._generator().generate(ids, attention_mask=mask, **kwargs, **extra)


class TeacherSamplesSource(TextSource):
    """Sample ``i`` of the stream is document ``sample-{i}``; batches are generated when first read."""

    streamed = True

    def __init__(self, spec: DataSource, sampler: TeacherSampler | None) -> None:
        super().__init__(spec)
        if sampler is None:
            raise DataError(
                "builtin:teacher-samples needs the teacher to sample from; it is available inside `surgery apply` "
                "(and surgery.data.Corpus.build(..., sampler=TeacherSampler(model, tokenizer, identity)))"
            )
        self.sampler = sampler
        self.cfg = spec.sampling or SamplingConfig()
        self.read_batch = self.cfg.batch_size
        self._batch: tuple[int, list[str]] | None = None
        self._seed = 0

    def identity(self) -> dict[str, Any]:
        return {"teacher": self.sampler.identity, "sampling": self.cfg.model_dump()}

    def doc_ids(self) -> list[str]:
        raise DataError("builtin:teacher-samples is a stream without a listing")

    def documents(self, seed: int) -> Iterator[Document]:
        self._seed = seed
        i = 0
        while True:
            doc_id = f"sample-{i:08d}"
            yield doc_id, (lambda doc_id=doc_id: self.read(doc_id))
            i += 1

    def read(self, doc_id: str) -> str:
        i = int(doc_id.removeprefix("sample-"))
        index, row = divmod(i, self.cfg.batch_size)
        if self._batch is None or self._batch[0] != index:
            texts = self.sampler.sample(self.cfg.batch_size, self.cfg, derive_seed("teacher-samples", self._seed, index))
            self._batch = (index, texts)
        return self._batch[1][row]
