"""The typed, versioned messages that cross the wire.

Runtime halves (edge SDK, aggregator, algorithms) exchange only these; there is no
dict-of-strings contract. Algorithm payloads ride in ``Task.config`` / ``Update.tensors`` /
blobs whose schemas live beside each algorithm. Adding a field to a message is
backward compatible (older readers ignore it with a warning); changing a field's meaning
needs a ``VERSION`` bump.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

from .codec import Message, Tensors, register


def _check_sha256(value: object) -> None:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("sha256 must be 64 lowercase hex digits")


def _nonneg(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class BlobRef:
    """A content-addressed blob that travels separately in chunks (see :mod:`bridge.blobs`).
    Not a message by itself: it is embedded (as JSON) in the messages that reference it."""

    sha256: str
    size: int
    chunk_size: int
    kind: str = ""  # e.g. "adapter", "emulator", "logits"

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        _nonneg("size", self.size)
        if self.chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")

    @property
    def total_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))  # integer ceil: exact for any size

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size, "chunk_size": self.chunk_size, "kind": self.kind}

    @classmethod
    def from_json(cls, data: dict) -> BlobRef:
        try:
            return cls(str(data["sha256"]), int(data["size"]), int(data["chunk_size"]), str(data.get("kind", "")))
        except (KeyError, TypeError, AttributeError, OverflowError) as exc:  # int(inf) overflows
            raise ValueError(f"bad blob reference: {exc}") from exc


@register
@dataclass
class Task(Message):
    """Aggregator -> client: train in round ``round`` with this algorithm and config; fetch the
    listed blobs first (by content hash, so a blob already held is not fetched again)."""

    TYPE = "task"
    VERSION = 1
    round: int
    algorithm: str
    config: dict = field(default_factory=dict)
    downloads: dict = field(default_factory=dict)  # name -> BlobRef JSON
    deadline: float = 0.0  # unix time after which the update is late
    tensors: Tensors = field(default_factory=dict)  # small inline payloads

    def __post_init__(self) -> None:
        _nonneg("round", self.round)
        for name, ref in self.downloads.items():
            BlobRef.from_json(ref)  # validates
            if not isinstance(name, str):
                raise ValueError("download names must be strings")

    def blob(self, name: str) -> BlobRef:
        return BlobRef.from_json(self.downloads[name])


@register
@dataclass
class Update(Message):
    """Client -> aggregator: the result of local training for ``round``."""

    TYPE = "update"
    VERSION = 1
    round: int
    algorithm: str
    num_examples: int
    metrics: dict = field(default_factory=dict)
    blobs: dict = field(default_factory=dict)  # name -> BlobRef JSON (large payloads)
    tensors: Tensors = field(default_factory=dict)  # small payloads inline

    def __post_init__(self) -> None:
        _nonneg("round", self.round)
        _nonneg("num_examples", self.num_examples)
        for ref in self.blobs.values():
            BlobRef.from_json(ref)

    def blob(self, name: str) -> BlobRef:
        return BlobRef.from_json(self.blobs[name])


@register
@dataclass
class KeyGrant(Message):
    """Aggregator -> one client, over its own (direct-encrypted) down topic: the content key of
    a broadcast blob, so the blob itself is encrypted once for everybody."""

    TYPE = "key_grant"
    VERSION = 1
    key_id: str
    key: str  # base64 AES-256 key
    round: int

    def __post_init__(self) -> None:
        _nonneg("round", self.round)
        try:  # the receiver decodes it outside its frame checks: refuse bad base64 here
            base64.b64decode(self.key.encode("ascii"), validate=True)
        except (AttributeError, ValueError) as exc:  # binascii.Error, UnicodeEncodeError
            raise ValueError(f"key must be base64 ({exc})") from None


@register
@dataclass
class ChunkRequest(Message):
    """Receiver -> sender: send these chunks of a blob again (the resume path)."""

    TYPE = "chunk_request"
    VERSION = 1
    sha256: str
    missing: list  # [[start, stop), ...] half-open ranges of chunk indices

    def __post_init__(self) -> None:
        _check_sha256(self.sha256)
        if not isinstance(self.missing, list):
            raise ValueError("missing must be a list of ranges")
        stop = 0
        for r in self.missing:
            if not (isinstance(r, list) and len(r) == 2 and all(isinstance(i, int) for i in r) and 0 <= r[0] < r[1]):
                raise ValueError(f"bad chunk range {r!r}")
            # sorted and disjoint (as to_ranges writes them): overlapping ranges would make the
            # sender resend the same chunks once per range
            if r[0] < stop:
                raise ValueError(f"chunk range {r!r} overlaps or precedes the one before")
            stop = r[1]


@register
@dataclass
class BlobAck(Message):
    """Receiver -> sender: the blob arrived whole and verified; the sender may drop it."""

    TYPE = "blob_ack"
    VERSION = 1
    sha256: str

    def __post_init__(self) -> None:
        _check_sha256(self.sha256)


@register
@dataclass
class ErrorReport(Message):
    """A typed error that crosses the wire (never a traceback)."""

    TYPE = "error"
    VERSION = 1
    code: str
    detail: str = ""
    ref: str | None = None  # message id or blob hash the error is about
    round: int = 0


@register
@dataclass
class Note(Message):
    """Free-form, small, typed-by-``kind`` control message (e.g. "join", "leave", "ack",
    "round_closed"), for signalling that needs no schema of its own."""

    TYPE = "note"
    VERSION = 1
    kind: str
    data: dict = field(default_factory=dict)
    round: int = 0


# --------------------------------------------------------------------------------------------
# inference over the wire: request/response, correlated by ``request_id`` in the (encrypted) body


def _check_request_id(request_id: object) -> None:
    if not isinstance(request_id, str) or not request_id or len(request_id) > 128:
        raise ValueError("request_id must be a non-empty string of at most 128 characters")


@register
@dataclass
class LogitsRequest(Message):
    """Client -> aggregator: the large model's next-token log-probabilities after each of the
    last ``positions`` prefixes of ``ids``, top ``top_k`` per position (proxy-tuned generation
    on the device). Out of round: the endpoint's stale-round floor does not apply to it
    (:data:`ROUNDLESS_TYPES`).

    ``__post_init__`` checks the structure (so a frame that decodes is well-typed);
    :meth:`problem` the ranges, so that a request out of range still reaches the server and
    gets a :class:`LogitsResponse` with ``error`` set instead of vanishing as a malformed frame."""

    TYPE = "logits_request"
    VERSION = 1
    request_id: str
    ids: list = field(default_factory=list)  # token ids (ints)
    positions: int = 1
    top_k: int = 20

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if not isinstance(self.ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in self.ids):
            raise ValueError("ids must be a list of ints")
        for name in ("positions", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int")

    def problem(self, vocab_size: int | None = None) -> str:
        """Why this request cannot be answered ("" when it can)."""
        if not self.ids:
            return "ids is empty"
        if not 1 <= self.positions <= len(self.ids):
            return f"positions must be in [1, {len(self.ids)}], got {self.positions}"
        if self.top_k < 1:
            return f"top_k must be >= 1, got {self.top_k}"
        if vocab_size is not None and any(not 0 <= i < vocab_size for i in self.ids):
            return f"token ids must be in [0, {vocab_size})"
        return ""


@register
@dataclass
class LogitsResponse(Message):
    """Aggregator -> client: the answer to the :class:`LogitsRequest` with the same
    ``request_id``. ``tensors`` holds ``values`` (float16/float32 log-probabilities,
    [positions, k], descending) and ``ids`` (int32 token ids, same shape); or ``error`` is set
    and ``tensors`` is empty."""

    TYPE = "logits_response"
    VERSION = 1
    request_id: str
    tensors: Tensors = field(default_factory=dict)
    error: str = ""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if not isinstance(self.error, str):
            raise ValueError("error must be a string")
        if not self.tensors:
            return
        if self.error:
            raise ValueError("an error response carries no tensors")
        if set(self.tensors) != {"values", "ids"}:
            raise ValueError(f"tensors must be exactly 'values' and 'ids', got {sorted(self.tensors)}")
        values, ids = self.tensors["values"], self.tensors["ids"]
        if values.ndim != 2 or values.shape != ids.shape or values.shape[0] < 1 or values.shape[1] < 1:
            raise ValueError(f"values {values.shape} and ids {ids.shape} must be the same non-empty 2-D shape")
        if values.dtype not in (np.float16, np.float32):
            raise ValueError(f"values must be float16 or float32, got {values.dtype}")
        if ids.dtype != np.int32:
            raise ValueError(f"ids must be int32, got {ids.dtype}")

    @property
    def values(self) -> np.ndarray:
        return self.tensors["values"]

    @property
    def ids(self) -> np.ndarray:
        return self.tensors["ids"]


#: message types outside the round structure: the endpoint's stale-round floor skips them
ROUNDLESS_TYPES = frozenset({LogitsRequest.TYPE, LogitsResponse.TYPE})
