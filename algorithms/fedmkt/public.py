"""What both FedMKT halves must agree on about the public set D_p, and the blobs that carry it.

- The public set travels to the clients as a blob (``public_to_arrays``): the aggregator's
  texts, selected and cut by :func:`select_public`. Sending the texts (public data by
  definition) guarantees that sample s is the same string on every side, which the token
  alignment needs.
- Every model reads a sample as ``tokenizer(text, add_special_tokens=False)`` cut to
  ``public_block_size`` tokens (:func:`encode_public`): no BOS/EOS, so the DTW alignment of two
  tokenisations compares text with text.
- The LLM's vocabulary travels once as a blob (``vocab_to_arrays``; content-addressed, so the
  aggregator only re-grants its key in later rounds): a client maps LLM ids into its own
  vocabulary without holding the LLM's tokenizer.
- The LLM's top-k payload over D_p travels as a *teacher* blob: the payload arrays plus the
  LLM's token ids of every sample (``token_ids`` / ``token_offsets``) and the SHA-256 of the
  public blob it was computed on.

Every blob is a safetensors tensor dict (never pickle); strings are UTF-8 bytes + offsets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from typing import Any

import numpy as np

from algorithms.base import pack_state
from algorithms.core.token_markers import ROLES, Vocabulary

from .payload import LogitsPayload, PayloadError, payload_from_logits

__all__ = [
    "TeacherPayload",
    "concat_payloads",
    "encode_public",
    "family_adapter_blob",
    "family_base_blob",
    "family_of_blob",
    "model_payload",
    "public_from_arrays",
    "public_sha256",
    "public_to_arrays",
    "select_public",
    "vocab_from_arrays",
    "vocab_hash_array",
    "vocab_hash_of",
    "vocab_to_arrays",
]


# -- the public set -------------------------------------------------------------------------


def select_public(
    texts: Sequence[Any], max_samples: int | None, max_chars: int, split: bool = True
) -> list[str]:
    """D_p as every side sees it: plain texts (``str`` or ``{"text": ...}``) as pieces of at
    most ``max_chars``, each ending at a word boundary, the first ``max_samples`` pieces with
    at least two words (so any tokenizer gives at least two tokens, i.e. one prediction).

    ``split`` (default): a longer text becomes consecutive pieces, so D_p holds all of the
    public text; false keeps its first piece only (a truncation, as a max-length tokenizer call
    does; on the bundled domains it threw away about 45 % of the public tokens). Pieces are cut in
    characters, not tokens, so every tokenizer reads the same strings (the token alignment
    compares text with text). Whitespace inside a piece is kept as it is: the models learn
    from these texts, and line breaks are text."""
    out: list[str] = []
    for item in texts:
        text = item.get("text") if isinstance(item, Mapping) else item
        if not isinstance(text, str):
            continue
        pieces = _pieces(text.strip(), max_chars)
        for piece in pieces if split else islice(pieces, 1):
            if len(piece.split()) < 2:
                continue
            out.append(piece)
            if max_samples is not None and len(out) >= max_samples:
                return out
    return out


def _pieces(text: str, max_chars: int):
    """``text`` as consecutive pieces of at most ``max_chars``, each cut at its last
    whitespace (mid-word only where a piece holds none); the whitespace at a cut is dropped."""
    while text:
        if len(text) <= max_chars:
            yield text
            return
        cut = text[: max_chars + 1]
        space = max(cut.rfind(c) for c in " \n\t")
        end = space if space > 0 else max_chars
        yield text[:end].rstrip()
        text = text[end:].lstrip()


def _strings_to_arrays(strings: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blobs = [s.encode("utf-8", "surrogatepass") if s is not None else b"" for s in strings]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()
    present = np.asarray([s is not None for s in strings], dtype=np.uint8)
    return data, offsets, present


def _strings_from_arrays(
    data: np.ndarray, offsets: np.ndarray, present: np.ndarray | None = None
) -> list:
    if data.dtype != np.uint8 or data.ndim != 1 or offsets.dtype != np.int64 or offsets.ndim != 1:
        raise PayloadError("string arrays must be uint8 bytes and int64 offsets")
    if (
        len(offsets) < 1
        or offsets[0] != 0
        or offsets[-1] != len(data)
        or np.any(np.diff(offsets) < 0)
    ):
        raise PayloadError("string offsets do not cover the bytes")
    raw = data.tobytes()
    try:
        out = [
            raw[offsets[i] : offsets[i + 1]].decode("utf-8", "surrogatepass")
            for i in range(len(offsets) - 1)
        ]
    except UnicodeDecodeError as exc:
        raise PayloadError(f"string arrays are not UTF-8: {exc}") from None
    if present is not None:
        if present.shape != (len(out),):
            raise PayloadError("string presence flags do not match the strings")
        out = [s if p else None for s, p in zip(out, present.tolist(), strict=True)]
    return out


def public_to_arrays(texts: Sequence[str]) -> dict[str, np.ndarray]:
    data, offsets, _ = _strings_to_arrays(texts)
    return {"text_utf8": data, "text_offsets": offsets}


def public_from_arrays(arrays: Mapping[str, np.ndarray]) -> list[str]:
    try:
        return _strings_from_arrays(arrays["text_utf8"], arrays["text_offsets"])
    except KeyError as exc:
        raise PayloadError(f"public-set blob lacks {exc}") from None


def public_sha256(texts: Sequence[str]) -> bytes:
    """The digest that ties a teacher payload to the public set it was computed on."""
    return hashlib.sha256(pack_state(public_to_arrays(texts))).digest()


def encode_public(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each sample as the model reads it: no special tokens, at most ``max_tokens`` tokens."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    out = [list(map(int, ids[:max_tokens])) for ids in enc]
    short = [s for s, ids in enumerate(out) if len(ids) < 2]
    if short:
        raise PayloadError(f"public samples {short[:5]} give fewer than 2 tokens")
    return out


# -- vocabularies ---------------------------------------------------------------------------


def vocab_hash_array(hex_digest: str) -> np.ndarray:
    """A client's vocabulary hash (:func:`algorithms.core.token_markers.vocab_hash`) as the
    ``vocab_hash`` tensor of its update: 32 bytes."""
    return np.frombuffer(bytes.fromhex(hex_digest), dtype=np.uint8).copy()


def vocab_hash_of(arrays: Mapping[str, np.ndarray]) -> str:
    arr = arrays.get("vocab_hash")
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.shape != (32,):
        raise PayloadError("the update lacks vocab_hash (32 bytes, uint8)")
    return arr.tobytes().hex()


def family_adapter_blob(hex_digest: str) -> str:
    """Blob (and state prefix) name of the shared adapter of one client family."""
    return f"adapter-{hex_digest[:16]}"


def family_base_blob(hex_digest: str) -> str:
    """Blob (and state prefix) name of the aligned base of one client family."""
    return f"base-{hex_digest[:16]}"


def family_of_blob(name: str) -> str | None:
    """The family digest prefix a per-family blob name carries, or None for a shared blob."""
    for prefix in ("adapter-", "base-"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


def vocab_to_arrays(vocab: Vocabulary) -> dict[str, np.ndarray]:
    data, offsets, present = _strings_to_arrays(vocab.tokens)
    roles = dict(vocab.roles)
    return {
        "vocab_utf8": data,
        "vocab_offsets": offsets,
        "vocab_present": present,
        "vocab_style": np.frombuffer(vocab.style.encode("ascii"), dtype=np.uint8).copy(),
        "vocab_roles": np.asarray([roles.get(r, -1) for r in ROLES], dtype=np.int64),
        "vocab_specials": np.asarray(sorted(vocab.special_ids), dtype=np.int64),
    }


def vocab_from_arrays(arrays: Mapping[str, np.ndarray]) -> Vocabulary:
    try:
        tokens = _strings_from_arrays(
            arrays["vocab_utf8"], arrays["vocab_offsets"], arrays["vocab_present"]
        )
        style = arrays["vocab_style"].tobytes().decode("ascii")
        role_ids = arrays["vocab_roles"].tolist()
        specials = arrays["vocab_specials"].tolist()
    except (KeyError, UnicodeDecodeError, AttributeError) as exc:
        raise PayloadError(f"vocabulary blob is malformed: {exc}") from None
    if len(role_ids) != len(ROLES):
        raise PayloadError("vocabulary blob has a roles table of the wrong size")
    roles = tuple((r, int(i)) for r, i in zip(ROLES, role_ids, strict=True) if i >= 0)
    try:
        return Vocabulary(tuple(tokens), style, roles, frozenset(int(i) for i in specials))
    except ValueError as exc:
        raise PayloadError(f"vocabulary blob is malformed: {exc}") from None


# -- payloads over D_p -------------------------------------------------------------------------


def concat_payloads(parts: Sequence[LogitsPayload]) -> LogitsPayload:
    """One payload with the samples of ``parts`` in order (same k and vocabulary size)."""
    if not parts:
        raise PayloadError("no payloads to concatenate")
    if len({(p.k, p.vocab_size) for p in parts}) != 1:
        raise PayloadError("payloads to concatenate differ in k or vocabulary size")
    offsets = [np.zeros(1, dtype=np.int64)]
    base = 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    return LogitsPayload(
        np.concatenate([p.topk_values for p in parts]),
        np.concatenate([p.topk_ids for p in parts]),
        np.concatenate(offsets),
        np.concatenate([p.sample_ce for p in parts]),
        parts[0].vocab_size,
    )


def model_payload(
    forward: Callable[[Any, Any], Any],
    samples: Sequence[Sequence[int]],
    *,
    k: int,
    vocab_size: int,
    pad_id: int,
    batch_size: int = 16,
) -> LogitsPayload:
    """The top-k payload of a model over tokenised samples (in order). ``forward(ids, mask)``
    returns ``[B, T, V]`` logits or log-probabilities for right-padded ``[B, T]`` batches;
    ``vocab_size`` is the sender's vocabulary (logit columns past it are padding)."""
    import torch

    parts = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), int(pad_id), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
                mask[i, : len(s)] = 1
            logits = forward(ids, mask)
            vocab = min(int(vocab_size), int(logits.shape[-1]))
            parts.append(
                payload_from_logits(
                    logits.float().cpu(), ids, mask, k=min(k, vocab), vocab_size=vocab
                )
            )
    return concat_payloads(parts)


class TeacherPayload:
    """A model's payload over D_p with the token ids it read: what a receiver needs to align
    the teacher's rows with its own tokenisation (arrays: the payload's, ``token_ids`` [sum L]
    int32, ``token_offsets`` [S+1] int64, ``public_sha256`` [32] uint8)."""

    def __init__(
        self, payload: LogitsPayload, tokens: Sequence[Sequence[int]], public_digest: bytes
    ):
        if len(tokens) != payload.num_samples:
            raise PayloadError(f"{len(tokens)} token lists for {payload.num_samples} samples")
        if any(len(t) - 1 != n for t, n in zip(tokens, payload.lengths.tolist(), strict=True)):
            raise PayloadError(
                "teacher payload rows do not match its token lists (L - 1 rows per sample)"
            )
        if len(public_digest) != 32:
            raise PayloadError("public digest must be 32 bytes")
        self.payload = payload
        self.tokens = [list(map(int, t)) for t in tokens]
        self.public_digest = bytes(public_digest)

    def to_arrays(self) -> dict[str, np.ndarray]:
        lengths = [len(t) for t in self.tokens]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        flat = np.asarray([i for t in self.tokens for i in t], dtype=np.int32)
        return {
            **self.payload.to_arrays(),
            "token_ids": flat,
            "token_offsets": offsets,
            "public_sha256": np.frombuffer(self.public_digest, dtype=np.uint8).copy(),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TeacherPayload:
        try:
            flat, offsets, digest = (
                arrays["token_ids"],
                arrays["token_offsets"],
                arrays["public_sha256"],
            )
        except KeyError as exc:
            raise PayloadError(f"teacher payload lacks {exc}") from None
        if flat.dtype != np.int32 or offsets.dtype != np.int64 or digest.dtype != np.uint8:
            raise PayloadError("teacher token arrays have the wrong dtypes")
        if (
            len(offsets) < 1
            or offsets[0] != 0
            or offsets[-1] != len(flat)
            or np.any(np.diff(offsets) < 0)
        ):
            raise PayloadError("teacher token offsets do not cover the token ids")
        payload = LogitsPayload.from_arrays(arrays)
        tokens = [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
        return cls(payload, tokens, digest.tobytes())
