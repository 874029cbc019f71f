"""Text sources -> one token stream per split -> packed, seeded, resumable batches.

Sources (``DataSource.source``, :mod:`.sources`, :mod:`.hub`):

- ``builtin:python-stdlib``: the standard library's ``.py`` files (test suites,
  site-packages, idlelib, turtledemo, encodings tables and pydoc_data left out),
  one document per file, ids are paths relative to the stdlib root.
- ``builtin:python-docs``: ``pydoc_data.topics.topics`` (English reference prose),
  one document per topic.
- a glob of local files (``**`` recursive): ``.jsonl`` gives one document per line
  (field ``text_field``), any other file one document per file (UTF-8). Ids are
  paths relative to the glob's fixed prefix, so a moved corpus keeps its split.
- ``hf:<dataset>[/<config>]``: a Hugging Face dataset through ``datasets``, one
  document per row; streamed (``streaming: true``, the default) in an order drawn
  from the seed, ids are positions in that stream, and reading stops at the budget.

:meth:`Corpus.build` walks each source's documents in a seeded order, routes every
document to held-out or training by a stable hash of (seed, source, document id),
so the split never depends on the token budget and the two never overlap, tokenizes
(with the tokenizer's own specials, e.g. a BOS for Llama-3/Gemma, and EOS after
every document) and stops once both budgets are met. Sources share the budget by
weight; a source that runs dry leaves its share to the others.

Small corpora stay in memory (int64). Streamed sources and budgets above
:data:`DISK_THRESHOLD` tokens are tokenized once into a token file under
``cache_dir()/data/<key>`` (:mod:`.store`: uint16/int32, written atomically, reused
by the next run with the same sources, tokenizer, seed and budgets); the corpus's
tensors then map that file and batches read only their own rows.

    corpus = Corpus.build(recipe.data, tokenizer, seed=recipe.data_seed, max_tokens=65536)
    stream = BatchStream(corpus.train, seq_len=512, batch_size=4, seed=recipe.data_seed)
    batch = stream.next()                                   # (4, 512) int64
    state = stream.state_dict()                             # json-able cursor
    mine = RankShard(stream, rank, world_size)              # a torchrun rank's disjoint share
    evals = heldout_batches(corpus, seq_len=512, batch_size=4, tokens=8192)
"""

from __future__ import annotations

from collections.abc import Sequence

from .batches import BatchStream, heldout_batches
from .budget import (
    check_repeats,
    data_config_from_cli,
    heldout_tokens_needed,
    tokens_needed,
    train_tokens_needed,
)
from .corpus import DISK_THRESHOLD, Corpus
from .hub import HFSource
from .shard import RankShard
from .sources import (
    BUILTIN_SOURCES,
    DocsSource,
    FilesSource,
    StdlibSource,
    TextSource,
    is_heldout,
    open_source,
)
from .tokens import encode_texts, separator_id, tokens_fingerprint

__all__: Sequence[str] = [
    "BUILTIN_SOURCES",
    "DISK_THRESHOLD",
    "BatchStream",
    "Corpus",
    "DocsSource",
    "FilesSource",
    "HFSource",
    "RankShard",
    "StdlibSource",
    "TextSource",
    "check_repeats",
    "data_config_from_cli",
    "encode_texts",
    "heldout_batches",
    "heldout_tokens_needed",
    "is_heldout",
    "open_source",
    "separator_id",
    "tokens_fingerprint",
    "tokens_needed",
    "train_tokens_needed",
]
