"""The byte tokenizer that goes with random teachers."""

from __future__ import annotations

import pytest
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer

from surgery.random_models import VOCAB_SIZE, random_config
from surgery.tokenizers import BYTE_OFFSET, byte_tokenizer

TEXTS = [
    "",
    "hello world",
    "héllo wörld 日本語 🤖 \x00\x01\x7f",
    "  leading and trailing spaces  \n\n\t",
    "literal specials stay text: <s> </s> <pad> <unk>",
    "def f(x):\n    return x  # comment\r\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text: str) -> None:
    tok = byte_tokenizer()
    ids = tok(text)["input_ids"]
    assert ids == [BYTE_OFFSET + b for b in text.encode("utf-8")]
    assert tok.decode(ids) == text


def test_ids_fit_random_models() -> None:
    tok = byte_tokenizer()
    config = random_config("llama")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert len(tok) == BYTE_OFFSET + 256 <= VOCAB_SIZE
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(BYTE_OFFSET + 255)) == BYTE_OFFSET + 255


def test_specials_decode_and_skip() -> None:
    tok = byte_tokenizer()
    ids = [tok.bos_token_id, *tok("ab")["input_ids"], tok.eos_token_id]
    assert tok.decode(ids) == "<s>ab</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_save_load(tmp_path) -> None:
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert again.decode(again(text)["input_ids"]) == text
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)


def test_streaming_decode_waits_for_whole_characters() -> None:
    tok = byte_tokenizer()
    text = "añb日🤖"
    stream = DecodeStream(skip_special_tokens=False)
    pieces = [stream.step(tok.backend_tokenizer, i) for i in tok(text)["input_ids"]]
    assert "".join(p for p in pieces if p) == text
    assert all(p is None or "\ufffd" not in p for p in pieces)


def test_batch_padding() -> None:
    tok = byte_tokenizer()
    batch = tok(["a", "abc"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 3)
    assert batch["input_ids"][0, 1:].tolist() == [0, 0]
