"""Shared builders for the tests/test_constrain_*.py files: a tiny byte-level BPE tokenizer trained on
JSON-like text (about 300 tokens, read by a model whose logits are V = 384 wide, so ids 300..383 have
no tokenizer entry), the bundled 4,096-token tokenizer, and llguidance backends over both.
The tests here check the builders themselves."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dgemma.constrain import LLGuidanceBackend

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
TINY_END_IDS = (1, 5)  # <eos> and <turn|>: several end ids, as the real model has
TINY_V = 384
BUNDLED = Path(__file__).parents[1] / "src" / "dgemma" / "bundled" / "small" / "tokenizer.json"
BUNDLED_V, BUNDLED_END_IDS = 4100, (1, 6)  # 4 ids past the tokenizer's 4,096

_CORPUS = [
    json.dumps({"name": "ann", "age": 31, "tags": ["x", "yz"], "ok": True}, separators=(",", ":")),
    json.dumps({"name": "bob lee", "age": 7, "tags": [], "ok": False, "score": -1.5e3}, separators=(",", ":")),
    '{"a":1,"b":[1,2,3],"c":null}', "[0,12,345,6789]", "the cat sat on the mat", "red green blue",
    'abc-123 xyz-9876 "quoted" \\n \\"', "true false null 0.25 -7",
] * 10


@functools.cache
def tiny_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def tiny_backend() -> LLGuidanceBackend:
    return LLGuidanceBackend.for_tokenizer(tiny_tokenizer(), TINY_V, TINY_END_IDS)


def bundled_backend() -> LLGuidanceBackend:
    return LLGuidanceBackend.for_tokenizer(BUNDLED, BUNDLED_V, BUNDLED_END_IDS)


def encode(backend: LLGuidanceBackend, text: str) -> list[int]:
    return backend.tokenizer.tokenize_str(text)


def test_tiny_tokenizer_is_smaller_than_the_model_vocab():
    size = tiny_tokenizer().get_vocab_size()
    assert 256 < size < TINY_V
    backend = tiny_backend()
    assert backend.token_bytes()[size:] == [None] * (TINY_V - size)
    assert all(backend.token_bytes()[i] is None for i in range(len(SPECIALS)))


def test_tiny_tokenizer_round_trips_json():
    backend = tiny_backend()
    text = '{"name":"zoë","age":3}'
    assert backend.tokenizer.decode_str(encode(backend, text)) == text


def test_backend_from_a_dgemma_tokenizer_is_the_cached_one():
    import pytest

    from dgemma.tokenizer import Tokenizer

    tok = Tokenizer.from_directory(BUNDLED.parent)
    assert LLGuidanceBackend.for_tokenizer(tok, BUNDLED_V, BUNDLED_END_IDS) is bundled_backend()
    with pytest.raises(ValueError, match="vocab size too small"):
        LLGuidanceBackend.for_tokenizer(tok, 4000, BUNDLED_END_IDS)
    with pytest.raises(ValueError, match="end ids must be a non-empty list"):
        LLGuidanceBackend.for_tokenizer(tok, BUNDLED_V, [])
