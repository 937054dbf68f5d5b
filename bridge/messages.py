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


# --------------------------------------------------------------------------------------------
# secure aggregation (bridge/secagg.py): the four extra steps of a secure round. The masked
# input itself travels as an ordinary Update (tensor or blob "masked", uint32).

_B64_SIZES = {"c_pk": 32, "s_pk": 32, "sig": 64, "sign_pub": 32}
#: a PEM certificate with the envelope-keys extension is about 800 bytes
MAX_CERT_CHARS = 8192
#: ciphertexts of two Shamir shares (x, 66-byte values) plus AEAD overhead: about 300 bytes
MAX_SHARE_CHARS = 2048


def _check_b64(name: str, value: object, size: int | None = None, max_chars: int | None = None) -> None:
    if not isinstance(value, str) or (max_chars is not None and len(value) > max_chars):
        raise ValueError(f"{name} must be a base64 string" + (f" of at most {max_chars} chars" if max_chars else ""))
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, ValueError):
        raise ValueError(f"{name} must be base64") from None
    if size is not None and len(raw) != size:
        raise ValueError(f"{name} must decode to {size} bytes, got {len(raw)}")


def _check_party_map(name: str, value: object, limit: int = 4096) -> None:
    if not isinstance(value, dict) or len(value) > limit:
        raise ValueError(f"{name} must be a map of at most {limit} parties")
    for k in value:
        if not isinstance(k, str) or not k or len(k) > 128:
            raise ValueError(f"{name} keys must be party ids")


def _check_party_list(name: str, value: object, limit: int = 1 << 20) -> None:
    if not isinstance(value, list) or len(value) > limit or any(not isinstance(p, str) or not p for p in value):
        raise ValueError(f"{name} must be a list of party ids")


@register
@dataclass
class SecAggKeys(Message):
    """Client -> aggregator, step 1 of a secure round: two fresh X25519 public keys (``c_pk``
    encrypts the Shamir shares, ``s_pk`` agrees the pairwise masks) signed with the client's
    Ed25519 identity key, and the client's certificate (PEM), which the aggregator relays to its
    neighbours so that they can check the signing key against the federation CA."""

    TYPE = "secagg_keys"
    VERSION = 1
    round: int
    c_pk: str
    s_pk: str
    sig: str
    cert: str = ""

    def __post_init__(self) -> None:
        _nonneg("round", self.round)
        for name in ("c_pk", "s_pk", "sig"):
            _check_b64(name, getattr(self, name), _B64_SIZES[name])
        if not isinstance(self.cert, str) or len(self.cert) > MAX_CERT_CHARS:
            raise ValueError(f"cert must be a PEM string of at most {MAX_CERT_CHARS} chars")

    def advertisement(self) -> dict:
        return {"c_pk": self.c_pk, "s_pk": self.s_pk, "sig": self.sig}


@register
@dataclass
class SecAggNeighbours(Message):
    """Aggregator -> client, step 2: the signed keys of the client's neighbours in the round's
    sparse graph, each ``{"c_pk", "s_pk", "sig", "sign_pub", "cert"}``."""

    TYPE = "secagg_neighbours"
    VERSION = 1
    round: int
    neighbours: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _nonneg("round", self.round)
        _check_party_map("neighbours", self.neighbours)
        for who, ad in self.neighbours.items():
            if not isinstance(ad, dict):
                raise ValueError(f"neighbour {who!r} must be a map")
            for name, size in _B64_SIZES.items():
                _check_b64(f"{who}.{name}", ad.get(name), size)
            cert = ad.get("cert", "")
            if not isinstance(cert, str) or len(cert) > MAX_CERT_CHARS:
                raise ValueError(f"{who}.cert must be a PEM string")


@register
@dataclass
class SecAggShares(Message):
    """Client -> aggregator, step 3: per neighbour, the encrypted Shamir shares of this
    client's self-mask seed and mask key (only that neighbour can decrypt them). Aggregator ->
    client (the relay): per neighbour, the shares that neighbour encrypted for this client."""

    TYPE = "secagg_shares"
    VERSION = 1
    round: int
    shares: dict = field(default_factory=dict)  # party -> base64 ciphertext

    def __post_init__(self) -> None:
        _nonneg("round", self.round)
        _check_party_map("shares", self.shares)
        for who, ct in self.shares.items():
            _check_b64(f"shares[{who}]", ct, max_chars=MAX_SHARE_CHARS)


@register
@dataclass
class SecAggUnmask(Message):
    """Aggregator -> surviving client, step 5: which of its neighbours sent a masked input
    (``survivors``: reveal their self-mask shares) and which did not (``dropped``: reveal their
    mask-key shares). An honest client never reveals both for one neighbour."""

    TYPE = "secagg_unmask"
    VERSION = 1
    round: int
    survivors: list = field(default_factory=list)
    dropped: list = field(default_factory=list)

    def __post_init__(self) -> None:
        _nonneg("round", self.round)
        _check_party_list("survivors", self.survivors)
        _check_party_list("dropped", self.dropped)


@register
@dataclass
class SecAggReveal(Message):
    """Client -> aggregator, step 6: the decrypted shares asked for, per neighbour
    ``{"x": int, "b": base64}`` (survivor) or ``{"x": int, "s": base64}`` (dropped)."""

    TYPE = "secagg_reveal"
    VERSION = 1
    round: int
    shares: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _nonneg("round", self.round)
        _check_party_map("shares", self.shares)
        for who, sh in self.shares.items():
            if not isinstance(sh, dict) or set(sh) not in ({"x", "b"}, {"x", "s"}):
                raise ValueError(f"share of {who!r} must be {{'x', 'b'}} or {{'x', 's'}}")
            if isinstance(sh["x"], bool) or not isinstance(sh["x"], int) or not 0 < sh["x"] < 1 << 16:
                raise ValueError(f"share of {who!r}: x must be a small positive int")
            _check_b64(f"share of {who!r}", sh.get("b", sh.get("s")), max_chars=256)
