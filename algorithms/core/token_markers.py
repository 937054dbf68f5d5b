"""Token marker conventions, their common normal form, and vocabularies as FedMKT sees them.

Marker conventions are compared through one *normal form* of every token (``normalize_token``):

- the text the token stands for, with every space written ``"▁"`` (so a word start is one
  leading ``"▁"`` in every convention);
- GPT-2 byte-level tokens are decoded from their byte alphabet (``"Ġ"`` -> ``"▁"``, ``"Ċ"`` ->
  ``"\\n"``, ``"Ã©"`` -> ``"é"``); bytes that are not complete UTF-8 stay as ``"<0xC3>"``;
- SentencePiece byte-fallback tokens ``"<0x41>"`` become their character when the byte is ASCII
  (``"A"``, ``"<0x20>"`` -> ``"▁"``) and keep the ``"<0xC3>"`` spelling otherwise;
- WordPiece tokens without ``"##"`` start a word (``"play"`` -> ``"▁play"``), tokens with it
  continue one (``"##ing"`` -> ``"ing"``).

Two tokens of different tokenizers match exactly when their normal forms are equal, and edit
distances are taken between normal forms, so a missing or extra word-start marker costs one
edit whatever the conventions. ``convert_token`` spells a token of one convention in another.
Known ambiguities, accepted: a literal ``"▁"`` character reads as a space, and a byte-level
token whose text is literally ``"<0xC3>"`` reads as that byte.

Special tokens (``Vocabulary.special_ids``) are never normalised; how they are mapped is
described in :mod:`algorithms.core.vocab_map`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from algorithms.core.errors import ModelError

__all__ = [
    "ROLES",
    "SPACE",
    "STYLES",
    "AlignmentError",
    "Vocabulary",
    "as_vocabulary",
    "convert_token",
    "normalize_token",
    "to_style",
    "token_text",
    "vocab_hash",
]

SPACE = "▁"
STYLES = ("bytelevel", "metaspace", "wordpiece")
ROLES = ("eos", "bos", "pad", "unk", "cls", "sep", "mask")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ESCAPED = re.compile("[\udc80-\udcff]")


class AlignmentError(ModelError, ValueError):
    """Vocabularies or sequences that cannot be aligned (bad style, empty vocabulary, ids)."""


def _gpt2_byte_alphabet() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _gpt2_byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _text_of_bytes(data: bytes) -> str:
    text = data.decode("utf-8", errors="surrogateescape")
    text = _ESCAPED.sub(lambda m: f"<0x{ord(m.group()) - 0xDC00:02X}>", text)
    return text.replace(" ", SPACE)


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise AlignmentError(f"unknown tokenizer style {style!r}; choose one of {list(STYLES)}")


def normalize_token(token: str, style: str) -> str:
    """The normal form of a (non-special) ``token`` of a ``style`` tokenizer (module doc)."""
    _check_style(style)
    if style == "bytelevel":
        try:
            data = bytes(_CHAR_TO_BYTE[c] for c in token)
        except KeyError:  # not byte-level text (an added token): compare it literally
            return token.replace(" ", SPACE)
        return _text_of_bytes(data)
    if style == "metaspace":
        m = _BYTE_TOKEN.fullmatch(token)
        if m:
            return _text_of_bytes(bytes([int(m.group(1), 16)]))
        return token.replace(" ", SPACE)
    if token.startswith("##"):
        return token[2:]
    return SPACE + token


def to_style(text: str, style: str) -> str:
    """Spell the normal form ``text`` in the convention of ``style`` (inverse of normalize).

    For metaspace an ASCII character that B only has as a byte-fallback token is returned as the
    character; ``build_vocab_map`` compares normal forms, so it finds the byte token anyway.
    """
    _check_style(style)
    if style == "metaspace":
        return text
    if style == "wordpiece":
        return text[1:] if text.startswith(SPACE) else "##" + text
    data = b"".join(
        bytes([int(part[3:5], 16)]) if _BYTE_TOKEN.fullmatch(part) else part.encode("utf-8")
        for part in re.split(r"(<0x[0-9A-F]{2}>)", text.replace(SPACE, " "))
    )
    return "".join(_BYTE_TO_CHAR[b] for b in data)


def convert_token(token: str, src_style: str, dst_style: str) -> str:
    """``token`` of a ``src_style`` vocabulary as a ``dst_style`` tokenizer spells it
    (``"Ġthe"``: bytelevel -> metaspace ``"▁the"``, -> wordpiece ``"the"``)."""
    return to_style(normalize_token(token, src_style), dst_style)


def token_text(token: str, style: str) -> str:
    """The normal form without its word-start marker: what sequence alignment compares."""
    text = normalize_token(token, style)
    return text[1:] if text.startswith(SPACE) else text


# --------------------------------------------------------------------------------------------
# vocabularies


def _infer_style(vocab: Mapping[str, int]) -> str:
    counts = {
        "bytelevel": sum(t.startswith("Ġ") for t in vocab),
        "metaspace": sum(t.startswith(SPACE) for t in vocab),
        "wordpiece": sum(t.startswith("##") for t in vocab),
    }
    best = max(counts, key=lambda k: counts[k])
    if counts[best] == 0:
        raise AlignmentError("cannot tell the vocabulary's marker style; pass style=")
    return best


def vocab_hash(tokenizer_or_vocab: Any) -> str:
    """SHA-256 (hex) of a token -> id map: a ``Mapping``, a :class:`Vocabulary` or anything with
    ``get_vocab()`` (a Hugging Face tokenizer). Independent of the map's iteration order."""
    if isinstance(tokenizer_or_vocab, Vocabulary):
        vocab: Mapping[str, int] = tokenizer_or_vocab.token_to_id
    elif isinstance(tokenizer_or_vocab, Mapping):
        vocab = tokenizer_or_vocab
    elif hasattr(tokenizer_or_vocab, "get_vocab"):
        vocab = tokenizer_or_vocab.get_vocab()
    else:
        raise AlignmentError(f"cannot hash a {type(tokenizer_or_vocab).__name__} as a vocabulary")
    pairs = sorted((int(i), str(t)) for t, i in vocab.items())
    blob = json.dumps(pairs, separators=(",", ":")).encode("ascii")  # \u-escapes: any str hashes
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class Vocabulary:
    """One side of a mapping: tokens by id (``None`` for unused ids), marker style, specials.

    ``roles`` pairs a role of ``ROLES`` with an id (kept in ``ROLES`` order, one id per role);
    role ids are always among ``special_ids``.
    """

    tokens: tuple[str | None, ...]
    style: str
    roles: tuple[tuple[str, int], ...] = ()
    special_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        _check_style(self.style)
        for role, i in self.roles:
            if role not in ROLES or not 0 <= i < len(self.tokens) or self.tokens[i] is None:
                raise AlignmentError(f"special role {role!r} -> id {i} is not in the vocabulary")
        if len({r for r, _ in self.roles}) != len(self.roles):
            raise AlignmentError("a special role is given twice")
        for i in self.special_ids:
            if not 0 <= i < len(self.tokens) or self.tokens[i] is None:
                raise AlignmentError(f"special id {i} is not in the vocabulary")
        roles = tuple(sorted(self.roles, key=lambda r: ROLES.index(r[0])))
        object.__setattr__(self, "roles", roles)
        object.__setattr__(self, "special_ids", frozenset(self.special_ids) | {i for _, i in roles})

    @classmethod
    def from_dict(
        cls,
        vocab: Mapping[str, int],
        style: str | None = None,
        roles: Mapping[str, str] | None = None,
        specials: Iterable[str] = (),
    ) -> Vocabulary:
        """From a token -> id map; ``roles`` maps role -> token (``{"eos": "</s>"}``); the
        role tokens and ``specials`` are the special tokens. ``style`` is inferred when None."""
        if not vocab:
            raise AlignmentError("empty vocabulary")
        ids = list(vocab.values())
        if min(ids) < 0 or len(set(ids)) != len(ids):
            raise AlignmentError("vocabulary ids must be distinct and non-negative")
        tokens: list[str | None] = [None] * (max(ids) + 1)
        for t, i in vocab.items():
            tokens[i] = t
        roles = dict(roles or {})
        unknown = [t for t in [*roles.values(), *specials] if t not in vocab]
        if unknown:
            raise AlignmentError(f"special tokens {unknown} are not in the vocabulary")
        role_ids = tuple((r, vocab[roles[r]]) for r in ROLES if r in roles)
        special = frozenset([vocab[t] for t in specials] + [i for _, i in role_ids])
        return cls(tuple(tokens), style or _infer_style(vocab), role_ids, special)

    @classmethod
    def from_tokenizer(cls, tok: Any) -> Vocabulary:
        """From a Hugging Face tokenizer: its vocabulary, style, special roles and specials."""
        from algorithms.core.tokenizer import tokenizer_style

        roles = {}
        for role in ROLES:
            token = getattr(tok, f"{role}_token", None)
            if isinstance(token, str) and token:
                roles[role] = token
        specials = [t for t in getattr(tok, "all_special_tokens", []) if isinstance(t, str)]
        return cls.from_dict(tok.get_vocab(), tokenizer_style(tok), roles, specials)

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def token_to_id(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens) if t is not None}

    def normal_form(self, i: int) -> str:
        """Normal form of id ``i`` (specials literally)."""
        token = self.tokens[i]
        if token is None:
            raise AlignmentError(f"id {i} has no token")
        return token if i in self.special_ids else normalize_token(token, self.style)

    def is_byte_fallback(self, i: int) -> bool:
        token = self.tokens[i]
        return (
            self.style == "metaspace" and token is not None and bool(_BYTE_TOKEN.fullmatch(token))
        )


def as_vocabulary(x: Any) -> Vocabulary:
    if isinstance(x, Vocabulary):
        return x
    if isinstance(x, Mapping):
        return Vocabulary.from_dict(x)
    return Vocabulary.from_tokenizer(x)
