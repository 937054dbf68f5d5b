"""Tokenizers of the three marker styles: round trips, determinism, save/load, detection."""

from __future__ import annotations

import json

import pytest

from algorithms.core.tokenizer import (
    BYTE_TOKENS,
    MARKERS,
    STYLES,
    TokenizerError,
    save_tokenizer,
    strip_marker,
    tokenizer_style,
    train_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "Computers are useless. They can only give you answers.",
    "In the beginning was the word, and the word was with the machine.",
    "Those who do not understand Unix are condemned to reinvent it, poorly.",
    "Science is what we understand well enough to explain to a computer.",
    "Love is patient, love is kind; it keeps no record of wrongs.",
    "Simple things should be simple, complex things should be possible.",
] * 20
PLAIN = "The quick dog explains science to a machine, poorly."


@pytest.fixture(scope="module", params=STYLES)
def trained(request):
    return request.param, train_tokenizer(CORPUS, vocab_size=400, style=request.param)


def test_round_trip_and_specials(trained):
    style, tok = trained
    ids = tok(PLAIN)["input_ids"]
    assert tok.decode(ids) == PLAIN
    assert tokenizer_style(tok) == style
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids  # nothing added silently
    assert len(tok) <= 400  # an upper bound: a small corpus may run out of merges
    tokens = tok.convert_ids_to_tokens(ids)
    assert any(t.startswith(MARKERS[style]) for t in tokens)


def test_deterministic(trained):
    style, tok = trained
    again = train_tokenizer(CORPUS, vocab_size=400, style=style)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_save_load(trained, tmp_path):
    from transformers import AutoTokenizer

    style, tok = trained
    save_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded(PLAIN)["input_ids"] == tok(PLAIN)["input_ids"]
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id
    assert tokenizer_style(loaded) == style


def test_metaspace_byte_fallback():
    tok = train_tokenizer(CORPUS, vocab_size=400, style="metaspace")
    vocab = tok.get_vocab()
    assert [vocab[b] for b in BYTE_TOKENS] == list(range(4, 260))
    text = "Ünïcödé ☃ rare"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert "<0xE2>" in tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids) == text


def test_bytelevel_never_unknown():
    tok = train_tokenizer(CORPUS, vocab_size=400, style="bytelevel")
    text = "日本 ☃ ü"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_errors_and_markers():
    with pytest.raises(TokenizerError, match="unknown tokenizer style"):
        train_tokenizer(CORPUS, vocab_size=400, style="sentencepiece")
    with pytest.raises(TokenizerError, match="at least"):
        train_tokenizer(CORPUS, vocab_size=100, style="bytelevel")
    assert strip_marker("Ġdog", "bytelevel") == ("dog", True)
    assert strip_marker("dog", "bytelevel") == ("dog", False)
    assert strip_marker("▁dog", "metaspace") == ("dog", True)
    assert strip_marker("##og", "wordpiece") == ("og", False)
    assert strip_marker("dog", "wordpiece") == ("dog", True)
