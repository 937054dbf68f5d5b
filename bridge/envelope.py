"""End-to-end envelope: what the broker sees of every payload.

Frame layout::

    b"CTE" | u8 version | u32 LE header length | header JSON | ciphertext (with GCM tag) | Ed25519 signature (64)

* The header (federation, round, sender, recipient, type, message id, chunk index/total,
  blob hash, timestamp, nonce, key reference) is authenticated as AEAD associated data and is
  covered by the signature, so it can be read for routing without being trusted before checks.
* Body: AES-256-GCM. The key is either *direct*, derived per message from an ephemeral X25519
  key and the recipient's static X25519 key through HKDF-SHA256 (the ephemeral public key
  travels in the header, so each message has a fresh key), or a *content key* named by
  ``kid`` that the recipient received before in a direct-encrypted :class:`KeyGrant`; the
  latter lets a broadcast blob be encrypted once and wrapped per recipient.
* Signature: Ed25519 by the sender over SHA-256(domain | header | ciphertext). Hashing first
  keeps signing cost at one SHA-256 pass (GB/s) for large chunks.

Checks on open run cheapest first and before any decryption: size, framing, version,
federation, recipient, sender, signature, replay window, then AEAD.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import (
    BridgeError,
    MalformedMessage,
    OversizedMessage,
    ReplayedMessage,
    TamperedMessage,
    UnknownRecipient,
    UnknownSender,
    UnsupportedVersion,
)
from .keys import Directory, Identity, b64d, b64e

MAGIC = b"CTE"
ENVELOPE_VERSION = 1
_PREFIX = struct.Struct("<3sBI")
SIG_LEN = 64
TAG_LEN = 16
BROADCAST = "*"
_DOMAIN = b"cotune/envelope/v1"
#: generous upper bound of framing + header + tag + signature, used to size chunks
ENVELOPE_OVERHEAD = 2048


def fits_one_message(tensor_bytes: int, max_message_bytes: int) -> bool:
    """Whether a message carrying ``tensor_bytes`` of tensors inline fits one MQTT message
    (room for the envelope twice over and 4 KiB of header fields); else it goes as a blob."""
    return tensor_bytes + 2 * ENVELOPE_OVERHEAD + 4096 < max_message_bytes

#: bounds of the numeric header fields: integers fit an int64; a timestamp is finite, not
#: negative and below 2**40 s (year 36812), so a NaN or Inf can never slip past the replay window
MAX_HEADER_INT = 2**63 - 1
MAX_TIMESTAMP = float(2**40)


class UnknownKey(BridgeError):
    """A content-key-encrypted message arrived before the KeyGrant that names its key. Not an
    attack by itself: the grant travels on another topic, so order is not guaranteed; the
    endpoint parks such frames briefly."""

    code = "unknown_key"

    def __init__(self, kid: str, message: str):
        super().__init__(message)
        self.kid = kid


@dataclass(frozen=True)
class Header:
    federation: str
    round: int
    sender: str
    recipient: str
    type: str
    mid: str
    ts: float
    nonce: bytes
    epk: bytes | None = None  # ephemeral X25519 public key (direct mode)
    kid: str | None = None  # content key id (content-key mode)
    blob: str | None = None
    chunk: int = 0
    total: int = 1
    bsize: int = 0  # size of the whole blob (chunk messages)
    csize: int = 0  # chunk size of that blob
    v: int = ENVELOPE_VERSION

    def to_bytes(self) -> bytes:
        d = {"v": self.v, "fed": self.federation, "round": self.round, "from": self.sender, "to": self.recipient,
             "type": self.type, "mid": self.mid, "ts": self.ts, "nonce": b64e(self.nonce)}
        if self.epk is not None:
            d["epk"] = b64e(self.epk)
        if self.kid is not None:
            d["kid"] = self.kid
        if self.blob is not None:
            d.update(blob=self.blob, chunk=self.chunk, total=self.total, bsize=self.bsize, csize=self.csize)
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Header:
        try:
            d = json.loads(raw)
            if not isinstance(d, dict):
                raise TypeError("header is not an object")
            v = d.get("v")
            if type(v) is not int or v != ENVELOPE_VERSION:  # not True, not 1.0
                raise UnsupportedVersion(f"envelope version {v!r} not supported (this build reads {ENVELOPE_VERSION})")
            h = cls(
                federation=_str(d["fed"]), round=_int(d["round"]), sender=_str(d["from"]),
                recipient=_str(d["to"]), type=_str(d["type"]), mid=_str(d["mid"]),
                ts=_timestamp(d["ts"]),
                nonce=b64d(_str(d["nonce"])), epk=b64d(_str(d["epk"])) if "epk" in d else None,
                kid=_str(d["kid"]) if "kid" in d else None, blob=_str(d["blob"]) if "blob" in d else None,
                chunk=_int(d.get("chunk", 0)), total=_int(d.get("total", 1)), bsize=_int(d.get("bsize", 0)),
                csize=_int(d.get("csize", 0)),
            )
        except UnsupportedVersion:
            raise
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # Recursion: deep nesting
            raise MalformedMessage(f"bad envelope header ({exc.__class__.__name__}: {exc})") from exc
        if len(h.nonce) != 12 or (h.epk is None) == (h.kid is None) or (h.epk is not None and len(h.epk) != 32):
            raise MalformedMessage("envelope header must carry a 12-byte nonce and exactly one of epk/kid")
        if h.round < 0 or not (0 <= h.chunk < h.total) or h.bsize < 0 or h.csize < 0:
            raise MalformedMessage("envelope header has out-of-range round/chunk/total/bsize")
        return h


def _str(v) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected string, got {type(v).__name__}")
    return v


def _int(v) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"expected integer, got {type(v).__name__}")
    if not -MAX_HEADER_INT <= v <= MAX_HEADER_INT:
        raise ValueError("integer out of the int64 range")
    return v


def _timestamp(v) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"expected a number, got {type(v).__name__}")
    if isinstance(v, int) and not 0 <= v <= MAX_TIMESTAMP:  # before float(): no OverflowError
        raise ValueError(f"timestamp {v} out of range")
    ts = float(v)
    if not (math.isfinite(ts) and 0.0 <= ts <= MAX_TIMESTAMP):
        raise ValueError(f"timestamp {ts!r} is not a finite time in [0, {MAX_TIMESTAMP:.0f}]")
    return ts


def new_message_id() -> str:
    return os.urandom(16).hex()


def content_key_id(key: bytes) -> str:
    return hashlib.sha256(b"cotune/kid|" + key).hexdigest()[:32]


def _direct_key(shared: bytes, epk: bytes, recipient_pub: bytes, federation: str, sender: str, recipient: str) -> bytes:
    info = f"cotune/v1/direct|{federation}|{sender}|{recipient}".encode()
    return HKDF(hashes.SHA256(), 32, salt=epk + recipient_pub, info=info).derive(shared)


def _digest(header: bytes, ciphertext: bytes | memoryview) -> bytes:
    h = hashlib.sha256(_DOMAIN)
    h.update(struct.pack("<I", len(header)))
    h.update(header)
    h.update(ciphertext)
    return h.digest()


@dataclass(frozen=True)
class Opened:
    header: Header
    plaintext: bytes


class ReplayGuard:
    """Rejects a message id seen within ``window_s`` and any timestamp outside
    [now - window_s, now + max_skew_s]. Memory is bounded by the message rate times the window
    (ids older than the window are pruned: they would fail the timestamp check anyway)."""

    def __init__(self, window_s: float = 600.0, max_skew_s: float = 120.0, clock=time.time):
        self.window_s, self.max_skew_s, self.clock = window_s, max_skew_s, clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, header: Header) -> None:
        now = self.clock()
        if not math.isfinite(header.ts):  # every comparison with NaN is false: refuse it first
            raise MalformedMessage(f"message {header.mid} has a non-finite timestamp")
        if header.ts < now - self.window_s:
            raise ReplayedMessage(f"message {header.mid} from {header.sender} is {now - header.ts:.0f}s old "
                                  f"(window {self.window_s:.0f}s)")
        if header.ts > now + self.max_skew_s:
            raise ReplayedMessage(f"message {header.mid} from {header.sender} is {header.ts - now:.0f}s in the future "
                                  f"(allowed skew {self.max_skew_s:.0f}s; check the device clock)")
        with self._lock:
            if header.mid in self._seen:
                raise ReplayedMessage(f"message {header.mid} from {header.sender} was already received")

    def remember(self, header: Header) -> None:
        now = self.clock()
        with self._lock:
            self._seen[header.mid] = header.ts
            while self._seen:
                mid, ts = next(iter(self._seen.items()))
                if ts >= now - self.window_s:
                    break
                self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


class Sealer:
    """Seals and opens envelopes for one party."""

    def __init__(self, identity: Identity, directory: Directory, *, max_message_bytes: int,
                 replay: ReplayGuard | None = None, clock=time.time):
        if identity.party_id not in directory:
            raise UnknownRecipient(f"{identity.party_id!r} is not in the directory of {directory.federation!r}")
        self.identity, self.directory = identity, directory
        self.max_message_bytes = max_message_bytes
        self.replay = replay or ReplayGuard(clock=clock)
        self.clock = clock
        self._content_keys: dict[str, AESGCM] = {}
        # derived direct keys by (peer, ephemeral public key): the chunks of one blob share one
        # ephemeral key, so the X25519 + HKDF work is done once per blob, not once per chunk
        self._direct_keys: OrderedDict[tuple[str, bytes], AESGCM] = OrderedDict()
        self._kx_pub = identity.kx_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    # -- content keys (broadcast) -------------------------------------------------------
    def add_content_key(self, key: bytes) -> str:
        if len(key) != 32:
            raise MalformedMessage("content keys are 32 bytes (AES-256)")
        kid = content_key_id(key)
        self._content_keys[kid] = AESGCM(key)
        return kid

    def has_content_key(self, kid: str) -> bool:
        return kid in self._content_keys

    def drop_content_key(self, kid: str) -> None:
        self._content_keys.pop(kid, None)

    # -- seal -----------------------------------------------------------------------------
    def seal(self, recipient: str, mtype: str, plaintext: bytes | memoryview, *, round: int = 0,
             kid: str | None = None, blob: str | None = None, chunk: int = 0, total: int = 1,
             bsize: int = 0, csize: int = 0, mid: str | None = None,
             ephemeral: X25519PrivateKey | None = None) -> bytes:
        """Encrypt and sign. ``kid`` selects a content key (required for broadcast).
        ``ephemeral``: reuse one ephemeral X25519 key for a series of messages (a blob's
        chunks); each message still has its own random nonce."""
        if len(plaintext) + ENVELOPE_OVERHEAD > self.max_message_bytes:
            raise OversizedMessage(
                f"{mtype} of {len(plaintext)} bytes exceeds the {self.max_message_bytes}-byte message limit "
                "(envelope overhead included); send large payloads as a blob, or raise max_message_bytes "
                "only if the broker accepts it")
        nonce = os.urandom(12)
        common = dict(federation=self.directory.federation, round=round, sender=self.identity.party_id,
                      recipient=recipient, type=mtype, mid=mid or new_message_id(), ts=self.clock(), nonce=nonce,
                      blob=blob, chunk=chunk, total=total, bsize=bsize, csize=csize)
        if kid is not None:
            aead = self._content_keys.get(kid)
            if aead is None:
                raise UnknownKey(kid, f"no content key {kid}")
            header = Header(kid=kid, **common)
        else:
            if recipient == BROADCAST:
                raise UnknownRecipient("broadcast messages need a content key (kid)")
            peer = self.directory.recipient(recipient)
            eph = ephemeral or X25519PrivateKey.generate()
            epk = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            aead = self._cached_key(recipient, epk) if ephemeral is not None else None
            if aead is None:
                aead = AESGCM(_direct_key(eph.exchange(peer.kx_key), epk, peer.kx_pub, self.directory.federation,
                                          self.identity.party_id, recipient))
                if ephemeral is not None:
                    self._remember_key(recipient, epk, aead)
            header = Header(epk=epk, **common)
        head = header.to_bytes()
        ct = aead.encrypt(nonce, plaintext, MAGIC + head)
        sig = self.identity.sign_key.sign(_digest(head, ct))
        return b"".join((_PREFIX.pack(MAGIC, ENVELOPE_VERSION, len(head)), head, ct, sig))

    # -- open -----------------------------------------------------------------------------
    def parse(self, frame: bytes | memoryview) -> tuple[Header, bytes, memoryview, bytes]:
        """Framing and header only: (header, header bytes, ciphertext, signature). Nothing trusted yet."""
        if len(frame) > self.max_message_bytes:
            raise OversizedMessage(f"received {len(frame)} bytes, over the {self.max_message_bytes}-byte limit")
        view = memoryview(frame)
        if len(view) < _PREFIX.size + TAG_LEN + SIG_LEN:
            raise MalformedMessage("frame too short to be an envelope")
        magic, version, head_len = _PREFIX.unpack_from(view)
        if magic != MAGIC:
            raise MalformedMessage("not a cotune envelope (bad magic)")
        if version != ENVELOPE_VERSION:
            raise UnsupportedVersion(f"envelope version {version} not supported (this build reads {ENVELOPE_VERSION})")
        start = _PREFIX.size
        end = start + head_len
        if end + TAG_LEN + SIG_LEN > len(view):
            raise MalformedMessage("header length points past the end of the frame")
        head = bytes(view[start:end])
        return Header.from_bytes(head), head, view[end:len(view) - SIG_LEN], bytes(view[len(view) - SIG_LEN:])

    def open(self, frame: bytes | memoryview, parsed: tuple | None = None) -> Opened:
        """Verify, check for replay and decrypt. ``parsed``: this frame's :meth:`parse` result
        when the caller already has it (a receiver that looked at the header first)."""
        header, head, ct, sig = parsed if parsed is not None else self.parse(frame)
        if header.federation != self.directory.federation:
            raise UnknownSender(f"message for federation {header.federation!r}, this is {self.directory.federation!r}")
        me = self.identity.party_id
        if header.recipient != me and header.recipient != BROADCAST:
            raise UnknownRecipient(f"message addressed to {header.recipient!r}, this is {me!r}")
        sender = self.directory.sender(header.sender)
        cached = self._cached_key(header.sender, header.epk) if header.epk is not None else None
        if cached is None:
            try:
                sender.verify_key.verify(sig, _digest(head, ct))
            except InvalidSignature:
                raise TamperedMessage(f"bad signature on message {header.mid} claimed from {header.sender!r}") from None
        # else: a later chunk under an ephemeral key whose first message from this sender had a
        # valid signature. The AEAD key is known only to that sender and to us, so a valid tag
        # (over ciphertext and, as associated data, the whole header) authenticates the message
        # as well as the signature would; we skip one SHA-256 pass and one Ed25519 verify per
        # chunk. Content-key (broadcast) messages are always verified: every recipient knows K.
        self.replay.check(header)
        if header.kid is not None:
            aead = self._content_keys.get(header.kid)
            if aead is None:
                raise UnknownKey(header.kid, f"message {header.mid} uses content key {header.kid} not granted yet")
        else:
            if header.recipient == BROADCAST:
                raise MalformedMessage("direct-encrypted message addressed to broadcast")
            aead = cached
            if aead is None:
                try:
                    epk = X25519PublicKey.from_public_bytes(header.epk)
                    shared = self.identity.kx_key.exchange(epk)
                except ValueError:  # a low-order point: the shared secret would be all zeros
                    raise MalformedMessage(f"message {header.mid}: bad ephemeral key") from None
                aead = AESGCM(_direct_key(shared, header.epk, self._kx_pub, header.federation, header.sender, me))
        try:
            plaintext = aead.decrypt(header.nonce, ct, MAGIC + head)
        except InvalidTag:
            raise TamperedMessage(f"AEAD tag of message {header.mid} from {header.sender!r} does not verify") from None
        self.replay.remember(header)
        if header.epk is not None:  # only keys that decrypted a signed message are kept
            self._remember_key(header.sender, header.epk, aead)
        return Opened(header, plaintext)

    def _cached_key(self, peer: str, epk: bytes) -> AESGCM | None:
        aead = self._direct_keys.get((peer, epk))
        if aead is not None:
            self._direct_keys.move_to_end((peer, epk))
        return aead

    def _remember_key(self, peer: str, epk: bytes, aead: AESGCM) -> None:
        self._direct_keys[(peer, epk)] = aead
        while len(self._direct_keys) > 256:
            self._direct_keys.popitem(last=False)
