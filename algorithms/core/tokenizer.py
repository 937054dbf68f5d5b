"""Train small tokenizers of the three marker conventions found in real LM families.

FedMKT's vocabulary mapping must normalise word-start markers between tokenizers, so the
project needs all three styles without downloading anything:

- ``"bytelevel"``: GPT-2 style byte-level BPE; a token that starts a word carries ``"Ġ"``.
- ``"metaspace"``: SentencePiece/Llama style BPE; a word start carries ``"▁"`` and characters
  outside the vocabulary fall back to byte tokens ``"<0x00>"`` .. ``"<0xFF>"``.
- ``"wordpiece"``: BERT style; a token that *continues* a word carries ``"##"``.

Every tokenizer has the same four special tokens (``<s>``, ``</s>``, ``<pad>``, ``<unk>``, ids
0..3), adds none of them automatically when encoding (causal-LM callers append ``eos`` where
they want it), trains deterministically for the same input, and is returned as a
``transformers.PreTrainedTokenizerFast`` that ``save_pretrained`` writes and
``AutoTokenizer.from_pretrained`` reads back offline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS",
    "BYTE_TOKENS",
    "EOS",
    "MARKERS",
    "PAD",
    "SPECIAL_TOKENS",
    "STYLES",
    "UNK",
    "TokenizerError",
    "save_tokenizer",
    "strip_marker",
    "tokenizer_style",
    "train_tokenizer",
]

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]

MARKERS = {"bytelevel": "Ġ", "metaspace": "▁", "wordpiece": "##"}
STYLES = tuple(MARKERS)

# Byte-fallback tokens, exactly as SentencePiece/Llama spell them.
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


class TokenizerError(ValueError):
    """A tokenizer could not be trained or its style could not be recognised."""


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    style: str = "bytelevel",
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer of ``style`` with at most ``vocab_size`` entries (specials included).

    ``texts`` is consumed once. The result is deterministic for the same texts, size and
    style.
    """
    if style not in MARKERS:
        raise TokenizerError(f"unknown tokenizer style {style!r}; choose one of {list(STYLES)}")
    minimum = {"bytelevel": 256 + 64, "metaspace": 256 + 128, "wordpiece": 256}[style]
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small for style {style!r}; use at least {minimum}"
        )
    builder = {"bytelevel": _bytelevel, "metaspace": _metaspace, "wordpiece": _wordpiece}[style]
    backend = builder(texts, vocab_size)
    return _wrap(backend, model_max_length)


def _bytelevel(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _metaspace(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    # Train a plain BPE over "▁"-prefixed words, then splice the 256 byte tokens in right after
    # the specials (where SentencePiece puts them) and switch byte fallback on.
    tok = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS),
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        limit_alphabet=200,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab: dict[str, int] = {}
    for piece in SPECIAL_TOKENS + BYTE_TOKENS:
        vocab[piece] = len(vocab)
    for piece, _ in trained:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    spec["model"]["vocab"] = vocab
    spec["model"]["byte_fallback"] = True
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    spec["decoder"] = json.loads(
        decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        ).__getstate__()
    )
    return Tokenizer.from_str(json.dumps(spec))


def _wordpiece(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    # The WordPiece trainer (and BPE with a continuing-subword prefix) numbers the "##x"
    # alphabet in hash-map order, which changes run to run and, through tie-breaks, can change
    # the vocabulary itself. So train a plain BPE in which every word starts with "▁" (that one
    # is deterministic) and rewrite its pieces: "▁abc" -> "abc", "abc" -> "##abc".
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )  # case and accents are kept: these tokenizers feed generative models
    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.normalizer = normalizer
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.BertPreTokenizer(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    limit_alphabet = 200
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,  # the "##" alphabet makes the rewrite longer; cut below
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        limit_alphabet=limit_alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    pieces = [p for p, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])]
    chars = sorted({p for p in pieces if len(p) == 1 and p != "▁" and p not in SPECIAL_TOKENS})
    ordered = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    for piece in pieces:
        if piece in SPECIAL_TOKENS or len(piece) == 1:
            continue
        ordered.append(piece[1:] if piece.startswith("▁") else "##" + piece)
    vocab: dict[str, int] = {}
    for piece in ordered:
        if piece not in vocab and len(vocab) < vocab_size:
            vocab[piece] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def _wrap(backend: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(tok, name) is None:  # pragma: no cover - guards the invariant above
            raise TokenizerError(f"trained tokenizer lacks {name}")
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str | os.PathLike) -> None:
    """``save_pretrained`` under the portable class name ``PreTrainedTokenizerFast``.

    transformers 5 records its own ``TokenizersBackend`` class, which transformers 4.x (still
    common on JetPack images) cannot resolve; both versions read ``PreTrainedTokenizerFast``.
    """
    tok.save_pretrained(str(path))
    config_path = os.path.join(str(path), "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")


def _backend_spec(tok: Any) -> dict | None:
    backend = tok if isinstance(tok, Tokenizer) else getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    return json.loads(backend.to_str())


def _contains(node: Any, type_name: str) -> bool:
    if isinstance(node, dict):
        if node.get("type") == type_name:
            return True
        return any(_contains(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_contains(v, type_name) for v in node)
    return False


def tokenizer_style(tok: Any) -> str:
    """Return ``"bytelevel"``, ``"metaspace"`` or ``"wordpiece"`` for any HF tokenizer.

    Reads the fast backend's pipeline when there is one (model, pre-tokenizer, decoder), and
    otherwise counts which marker the vocabulary uses most.
    """
    spec = _backend_spec(tok)
    if spec is not None:
        model_type = (spec.get("model") or {}).get("type")
        if model_type == "WordPiece":
            return "wordpiece"
        pipeline = [spec.get("pre_tokenizer"), spec.get("decoder")]
        if _contains(pipeline, "ByteLevel"):
            return "bytelevel"
        if _contains(pipeline, "Metaspace") or _contains(spec.get("normalizer"), "Prepend"):
            return "metaspace"
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    counts = {
        "bytelevel": sum(1 for t in vocab if t.startswith("Ġ")),
        "metaspace": sum(1 for t in vocab if t.startswith("▁")),
        "wordpiece": sum(1 for t in vocab if t.startswith("##")),
    }
    best = max(counts, key=lambda k: counts[k])
    if counts[best] == 0:
        raise TokenizerError("cannot tell the tokenizer's marker style (no marker in vocab)")
    return best


def strip_marker(token: str, style: str) -> tuple[str, bool]:
    """Split ``token`` into (text without marker, starts_a_word) for ``style``.

    WordPiece marks continuations instead of word starts, so a token without ``"##"`` starts a
    word there.
    """
    marker = MARKERS[style]
    if style == "wordpiece":
        if token.startswith(marker):
            return token[len(marker) :], False
        return token, True
    if token.startswith(marker):
        return token[len(marker) :], True
    return token, False
