"""The byte-level tokenizer that goes with the tiny random teachers (``random:<family>``).

Every UTF-8 byte is one token, so any text round-trips exactly and no vocabulary
file is needed. Ids match :mod:`surgery.random_models` (vocabulary 320):

    0 <pad>   1 <s> (bos)   2 </s> (eos)   3 <unk>   4..259 the bytes 0x00..0xFF   260..319 unused

Special tokens are never produced from text: ``"</s>"`` inside a document encodes
as its four bytes (``split_special_tokens=True``), so tokenizing user text is
lossless. Decoding goes through the byte-level decoder, so streaming decoders
(``tokenizers.decoders.DecodeStream``, ``TextStreamer``) wait for a multi-byte
character to complete.

    tok = byte_tokenizer()
    ids = tok("héllo")["input_ids"]          # [108, 199, 173, 112, 112, 115]
    assert tok.decode(ids) == "héllo"
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
BYTE_OFFSET = len(SPECIALS)  # byte b has id b + 4
N_BYTES = 256


def byte_offset_id(byte: int) -> int:
    """Token id of one byte value (0..255)."""
    return BYTE_OFFSET + byte


@lru_cache(maxsize=1)
def _backend_json() -> str:
    """The Rust tokenizer serialised once per process (building it is cheap, copying cheaper)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes (GPT-2 map)
    byte_to_char = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(N_BYTES):
        vocab[byte_to_char[b]] = byte_offset_id(b)
    assert set(byte_to_char.values()) == set(alphabet)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIALS))
    return backend.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ``ByteLevel`` uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(N_BYTES):
        if b not in printable:
            printable.append(b)
            chars.append(N_BYTES + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A fresh byte-level ``PreTrainedTokenizerFast`` (see the module docstring for the ids)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json()),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
